"""Generation: sampling parameters, the sampler, and the cached decode loop."""

from smoe.generation.loop import Completion, Event, StopChecker, generate, stream
from smoe.generation.sampling import SamplingParams, filter_logits, make_generator, sample, token_logprobs

__all__ = ["SamplingParams", "sample", "filter_logits", "make_generator", "generate", "stream", "Completion",
           "Event", "StopChecker", "token_logprobs"]
