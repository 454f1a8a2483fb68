"""Kernel-backed implementations (Triton on CUDA). Modules here import Triton themselves, on first
use: importing :mod:`graphquant.kernels` never imports Triton."""
