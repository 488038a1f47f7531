"""Memory trackers for a plan: torch's MemTracker (one process) and FSDPMemTracker (FSDP2) with one more
category, the fused log-prob op's workspace.

torch's trackers sort every live tensor storage into categories (parameters, buffers, gradients, activations,
backward temporaries, optimizer state; FSDP2 adds sharded / unsharded parameters and gradients and the
collectives' buffers) and keep the snapshot of the categories at the moment the total peaked. A storage that
is created while `workspace()` is active (inside a `token_loss` call: its logits tiles, and the gradients of the
hidden states and of the LM head that the op forms during the forward and holds until backward) is counted as
WORKSPACE instead of activation. The category enum is torch's own extended by one member (the trackers build
their snapshot dictionaries from `_ref_class`); members compare and hash as their string values, so torch's
own members still index the same entries.
"""
from __future__ import annotations

import contextlib
from enum import Enum

WORKSPACE = "Fused op workspace"


def _extended(ref_cls):
    from torch.distributed._tools.mem_tracker import _RefType

    members = {m.name: m.value for m in ref_cls}
    members["WORKSPACE"] = WORKSPACE
    return _RefType(ref_cls.__name__ + "Planned", members)


class _NoHandle:
    def remove(self):
        pass


class _WorkspaceMixin:
    _ws_depth = 0

    def _setup_workspace(self):
        self._ref_class = _extended(self._ref_class)
        self._ws = self._ref_class["WORKSPACE"]
        self._plain = {self._ref_class["ACT"].value, self._ref_class["TEMP"].value}

    def _track(self, reftype, t):
        if self._ws_depth and str.__str__(reftype) in self._plain:
            reftype = self._ws
        return super()._track(reftype, t)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        """torch's version registers a gradient hook on every parameter, which a frozen one (LoRA's base, the
        KL reference model) refuses: those get a placeholder handle instead (they never have a gradient)."""
        for p in module.parameters():
            if not p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                self._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_bw_hook(self, module, args):
        if module in self.memory_tracking:   # per-module stats were reset at a later micro-batch: skip them
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module, args):
        if module in self.memory_tracking:
            super()._post_bw_hook(module, args)

    def _update_peak_stats(self, peak_state) -> None:
        """Only the global peak and its snapshot (torch's version also walks every tracked module per operator
        to keep per-module peaks, which a plan does not read and which made a 30-layer step take minutes)."""
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)

    @contextlib.contextmanager
    def workspace(self):
        self._ws_depth += 1
        try:
            yield
        finally:
            self._ws_depth -= 1


def make_tracker(root=None, optimizer=None):
    """MemTracker (root None) or FSDPMemTracker(root, optimizer), with the WORKSPACE category."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if root is None:
        class Tracker(_WorkspaceMixin, MemTracker):
            pass
        t = Tracker()
    else:
        class Tracker(_WorkspaceMixin, FSDPMemTracker):
            pass
        t = Tracker(root, optimizer)
    t._setup_workspace()
    return t


def peak_snapshot(tracker) -> dict:
    """{category value: bytes} at the peak of the tracked device (fake tensors: the CPU), with "Total"."""
    snap = tracker.get_tracker_snapshot("peak")
    if not snap:
        return {"Total": 0}
    dev = max(snap, key=lambda d: snap[d].get("Total", 0))
    return {(k.value if isinstance(k, Enum) else str(k)): int(v) for k, v in snap[dev].items()}
