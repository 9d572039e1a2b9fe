"""Multi-turn inference: the flow sampler with three-context CFG and the cached `ChatSession`."""

from chatumm_kit.inference.sampler import SamplerConfig, cfg_combine, euler_sample, timestep_grid
from chatumm_kit.inference.script import read_script, run_script
from chatumm_kit.inference.session import AssistantReply, ChatSession, SessionConfig

__all__ = [
    "AssistantReply",
    "ChatSession",
    "SamplerConfig",
    "SessionConfig",
    "cfg_combine",
    "euler_sample",
    "read_script",
    "run_script",
    "timestep_grid",
]
