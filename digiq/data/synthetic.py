"""The pretraining data source of ``digiq pretrain-vlm``: randomised synthetic phone screens with questions of
general GUI skills (ground, refer, read, state, screen, parse, type, match), generated on the fly.

A data source, not an environment: nothing is stepped, so it is not in the environment registry. It draws
with the simulated phone's renderer, next to which it lives (:mod:`digiq.sim.synthetic`); the stages read it
from here.
"""

from digiq.sim.synthetic import SKILLS, Sample, is_correct, make_sample, sample_stream_item

__all__ = ["SKILLS", "Sample", "is_correct", "make_sample", "sample_stream_item"]
