"""ONNX export of a guided sampler, and an onnxruntime sampler that runs the exported graph.

``export(sampler, path, latent_shape)`` writes one ONNX graph holding everything a guided step does:

    mode="step":  x [B,C,H,W] f32, step [] i64, labels [B] i64, g1 [B] f32 (, history [K,B,C,H,W] f32)
                  (, z [B,C,H,W] f32) -> x_next (, history_next [K,B,C,H,W])
    mode="loop":  noise [B,C,H,W] f32, labels [B] i64, g1 [B] f32 (, z [S,B,C,H,W] f32) -> sample

Inside the graph: the 2B batch ([x | x] with labels [c | null]), the model, the guidance rule (CFG, or
ReCFG with the ratio table [K,T,C,H,W] and the per-step table rows and lerp weights as initializers,
gathered per label and step), and the solver update with the coefficient plan [S, 9] as an initializer.
The math is :func:`fastguide.kernels.reference.guided_step` (the Triton kernel is not exportable).
``g1`` is the per-sample guidance scale; steps outside a guidance interval use g1 = 1 inside the graph.
Stochastic solvers (DDPM, DDIM with eta > 0, Euler-ancestral, SDE-DPM-Solver) take their per-step noise as the
input ``z``. Every solver exports: a multistep plan's K history slots are the step graph's ``history`` input and
``history_next`` output and are carried in the loop graph's ONNX Loop state (zero at the start), its per-step
history weights and writes initializers; a sigma-space plan's first state is ``init_scale * noise`` (the loop
graph multiplies; OnnxSampler does it for a step graph). The batch axis is dynamic. ``OnnxSampler`` runs the
graph with onnxruntime (CUDA with IO binding when the CUDA provider really loaded, else CPU) and mirrors
``Sampler.sample``.
"""
from fastguide.onnx.export import (DEFAULT_OPSET, MIN_OPSET, MODES, GuidedGraph, HistoryStepModule, StepModule, export,
                                   step_to_loop)
from fastguide.onnx.metadata import FORMAT, read_metadata
from fastguide.onnx.runtime import CPU, CUDA, OnnxSampler

__all__ = ["CPU", "CUDA", "DEFAULT_OPSET", "FORMAT", "MIN_OPSET", "MODES", "GuidedGraph", "HistoryStepModule",
           "OnnxSampler", "StepModule", "export", "read_metadata", "step_to_loop"]
