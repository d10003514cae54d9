"""3C decomposition (He, Zhang and Sun, ICCV 2017, section 4.1) for any net slim builds: a convolution split
spatially (k_h x 1 then 1 x k_w, Jaderberg et al. 2014) and across channels (d' filters then 1 x 1, Zhang et al.
2016), fitted on calibration data (ReLU-aware least squares and GSVD), combined with channel pruning (slim.prune's
LASSO) and folded back where cheaper, as a rewrite of the prototxt and its blobs.

    from slim.decompose import DecomposePolicy, decompose_net, write_decomposed
    result = decompose_net("net.prototxt", "net.caffemodel", DecomposePolicy(method="3c", ranks={"conv2_1": 49}))
    write_decomposed(result, "decomposed")       # decomposed.prototxt, .caffemodel, .json
    print(result.report)

Modules: factor (the arithmetic), rewrite (the prototxt), ranks and plan (what to split, at what rank), calibration
(the samples), fit (a layer's fits), core (the driver and the files), report.
"""

from slim.decompose.core import DecomposeResult, decompose_net, write_decomposed
from slim.decompose.plan import PAPER_RATIO, DecomposePolicy, make_plans
from slim.decompose.report import DecomposeReport, LayerDecomposition
from slim.decompose.rewrite import METHODS, LayerPlan

__all__ = ["decompose_net", "write_decomposed", "DecomposeResult", "DecomposePolicy", "make_plans", "PAPER_RATIO",
           "DecomposeReport", "LayerDecomposition", "LayerPlan", "METHODS"]
