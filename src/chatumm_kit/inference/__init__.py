"""Multi-turn inference: the flow sampler with three-context CFG, the cached `ChatSession`, and `respond_batch`
(several sessions replying with one forward per step)."""

from chatumm_kit.inference.batch import respond_batch
from chatumm_kit.inference.guidance import cfg_combine
from chatumm_kit.inference.sampler import SamplerConfig, euler_sample, timestep_grid
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
    "respond_batch",
    "run_script",
    "timestep_grid",
]
