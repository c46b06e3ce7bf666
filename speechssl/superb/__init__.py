"""SUPERB-style evaluation: frozen (or tuned) upstream -> weighted layer sum -> task head -> results.json.

Entry points: :func:`speechssl.superb.train.run_superb` (one task on one upstream, with a learning-rate sweep),
:func:`speechssl.superb.report.make_report` (table + plots over experiment dirs), and the building blocks
re-exported here.
"""
from speechssl.superb.featurizer import Featurizer, cut_to_frames
from speechssl.superb.upstream import EncoderUpstream, FbankUpstream, MfccUpstream, Upstream, build_upstream

__all__ = ["Featurizer", "cut_to_frames", "Upstream", "EncoderUpstream", "FbankUpstream",
           "MfccUpstream", "build_upstream", "run_superb", "make_report"]


def __getattr__(name):
    if name == "run_superb":
        from speechssl.superb.train import run_superb

        return run_superb
    if name == "make_report":
        from speechssl.superb.report import make_report

        return make_report
    raise AttributeError(name)
