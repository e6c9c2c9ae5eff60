"""Repair: update what a rewrite kept, from what the model does (onnx-ir passes).

RepairWeightsPass        pruned layers' kept weights re-solved (SparseGPT's OBS updates) and
                         their mean output shift folded into their biases
RefitChannelsPass        every layer that read a removed channel re-solved by least squares
CompensateConstantsPass  what removed channels still carried (a BatchNorm shift, f(0) != 0)
                         folded into their readers' biases, without samples
"""

from onnxprune.repair.channels import RefitChannelsPass
from onnxprune.repair.compensation import CompensateConstantsPass
from onnxprune.repair.weights import RepairWeightsPass

__all__ = ["CompensateConstantsPass", "RefitChannelsPass", "RepairWeightsPass"]
