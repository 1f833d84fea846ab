"""ComfyUI face of DisTorch. Filled by the node-pack work; see adapter.py for the only ComfyUI-internal code."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
