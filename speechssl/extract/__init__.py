"""Hidden states and discrete units of a whole corpus (``speechssl extract``), and unit post-processing.

- :mod:`.hidden`: ``LayerEncoder`` (chosen layers of padded batches, equal to one utterance at a time),
  ``HiddenStates`` (the hidden-state source), ``check_layers``.
- :mod:`.units`: ``UnitSource`` (any ``batch -> int codes`` function as a source), run-length de-duplication,
  the unit BPE (sentencepiece over private-use characters).
- :mod:`.run`: ``extract_corpus`` (batches by duration, written as it goes, resumable, one part per process),
  ``extraction_loader``.
- :mod:`.writer`: the per-process output parts and their merge.
- :mod:`.post`: the unit BPE applied to an extraction's manifest, Shar export.
"""
from speechssl.extract.hidden import FieldSpec, HiddenStates, LayerEncoder, check_layers, layer_field
from speechssl.extract.run import ExtractOptions, extract_corpus, extraction_loader
from speechssl.extract.units import UnitBPE, UnitSource, expand, run_length, train_unit_bpe

__all__ = ["FieldSpec", "HiddenStates", "LayerEncoder", "check_layers", "layer_field", "ExtractOptions",
           "extract_corpus", "extraction_loader", "UnitBPE", "UnitSource", "expand", "run_length", "train_unit_bpe"]
