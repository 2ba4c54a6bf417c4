"""NExT-Chat 7B (Vicuna-7B v1.5 + CLIP ViT-L/14-336 + SAM ViT-H), stage 1 with the paper's settings
(see configs/_nextchat.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_nextchat", Path(__file__).with_name("_nextchat.py"))
_nextchat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nextchat)


def get_config():
    return _nextchat.config("7b", 1)
