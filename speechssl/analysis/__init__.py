"""Layer analysis: what each layer of a speech encoder knows about phones and speakers, and how phone-like
k-means units of that layer are (``speechssl analyze``).

- :mod:`.probes`: linear probes (``fit_probe``, ``probe_accuracy``, ``chance_accuracy``);
- :mod:`.units`: k-means units of a layer and their phone quality (``layer_units``, ``unit_quality``: PNMI,
  phone purity, cluster purity as in the HuBERT paper);
- :mod:`.states`: the cuts (``split_by_speaker``) and their hidden states, phones and speakers
  (``collect_states``, through the SUPERB upstream and ``FeatureSource``);
- :mod:`.layers`: the analysis of several upstreams (``analyze``, ``AnalyzeSettings``, ``best_layer``);
- :mod:`.plot`: the PNG (``plot_layers``).
"""
from speechssl.analysis.layers import MEASURES, AnalyzeSettings, analyze, analyze_layer, best_layer
from speechssl.analysis.plot import plot_layers
from speechssl.analysis.probes import chance_accuracy, fit_probe, probe_accuracy
from speechssl.analysis.units import layer_units, unit_quality

__all__ = ["MEASURES", "AnalyzeSettings", "analyze", "analyze_layer", "best_layer", "plot_layers",
           "chance_accuracy", "fit_probe", "probe_accuracy", "layer_units", "unit_quality"]
