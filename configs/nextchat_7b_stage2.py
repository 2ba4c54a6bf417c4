"""NExT-Chat 7B (Vicuna-7B v1.5 + CLIP ViT-L/14-336 + SAM ViT-H), stage 2 with the paper's settings
(see configs/_nextchat.py). Start stage 2 with `--init-from` the previous stage's workdir."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_nextchat", Path(__file__).with_name("_nextchat.py"))
_nextchat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nextchat)


def get_config():
    return _nextchat.config("7b", 2)
