"""NExT-Chat 13B (Vicuna-13B + CLIP ViT-L/14-336), stage 1 with the paper's settings (configs/_nextchat.py)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_nextchat", Path(__file__).with_name("_nextchat.py"))
_nextchat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nextchat)


def get_config():
    c = _nextchat.config("13b", 1)
    c.data.tokenizer = "data/vicuna-13b-v1.5"
    return c
