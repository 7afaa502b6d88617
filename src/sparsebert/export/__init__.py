"""Deployment: ONNX export (FP32 / INT8 from QAT) of trained folders, with PyTorch parity checks."""

from .evaluate import evaluate_onnx
from .onnx import ATOL, MANIFEST, OPSET, ExportError, export_onnx

__all__ = ["export_onnx", "evaluate_onnx", "ExportError", "MANIFEST", "OPSET", "ATOL"]
