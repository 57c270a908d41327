"""SAM / ASAM: sharpness-aware minimisation as a wrapper around an already built optimizer.

SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization") takes each step
with the gradient at the worst nearby weights: with g the gradient at w,

    e_w = rho * g / ||g||                   (SAM)
    e_w = rho * w^2 * g / || |w| * g ||     (ASAM, Kwon et al. 2021, "adaptive": the ball is scaled per weight)

the base optimizer then steps from w with the gradient taken at w + e_w. The formulas are those of the common
implementation, https://github.com/davda54/sam (ASAM's eta / bias-term variant is not implemented). ASAM's
recommended rho is about 10x SAM's (0.5 vs 0.05).

Every step costs two forward/backward passes, both run by the closure Lightning passes to ``step``::

    with first_pass_context(): closure()     # gradients at w (the Lightning module makes this DDP's
                                              # block_backward_sync: each rank perturbs with its own gradient,
                                              # the paper's m-sharpness)
    first_step(); zero_grad()                # w <- w + e_w
    second_pass_prelude()                    # optional (gradient accumulation: replay earlier micro-batches)
    closure()                                # gradients at w + e_w (second_pass is True while it runs)
    second_step()                            # w <- the original w, bit for bit; base.step()

``param_groups`` and ``defaults`` are the base optimizer's (LR schedulers, Lightning's LearningRateMonitor and
gradient clipping see and change the base's lr); ``state_dict()`` / ``load_state_dict()`` are the base's, so a
checkpoint of a SAM run holds exactly what a plain AdamW / SGD run's holds (and either can resume the other).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Optional

import torch

NO_CLOSURE = ("SAM needs a closure that recomputes the loss and gradients; fp16-mixed's GradScaler calls step() "
              "without one: use trainer.precision=bf16-mixed or 32-true")


class SAM(torch.optim.Optimizer):
    """Wrap ``base`` (e.g. AdamW or SGD, built over the model's parameter groups) with SAM or ASAM.

    Hooks for the training loop (attributes, shared with Lightning's ``LightningOptimizer`` wrapper, so setting
    them on ``self.optimizers()`` reaches this object):

    - ``first_pass_context``: zero-arg callable returning a context manager entered around the first closure
      call (default ``contextlib.nullcontext``; DDP's ``block_backward_sync`` skips the gradient all-reduce).
    - ``second_pass_prelude``: None or a zero-arg callable run after the weights are perturbed, before the
      second closure call.
    - ``second_pass``: True while the second closure call runs (the module logs nothing then).

    With gradient accumulation, :meth:`remember` / :meth:`arm` / :meth:`forget` replay the window's earlier
    micro-batches at the perturbed weights, so both passes see the whole accumulated batch.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"SAM wraps a built torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, SAM):
            raise TypeError("SAM cannot wrap another SAM; wrap its base optimizer instead")
        if not rho > 0:
            raise ValueError(f"SAM's rho must be > 0 (0.05 for SAM, ~0.5 for adaptive ASAM), got {rho!r}")
        self.base = base
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        # torch's Optimizer.__init__ sets up hooks and a private group list; the `param_groups` property
        # below then answers with the base's groups (it reads them live: base.load_state_dict replaces the list)
        super().__init__([p for g in base.param_groups for p in g["params"]], dict(base.defaults))
        self.defaults = base.defaults                  # the same dict: Lightning / vitlab read defaults["fused"]
        # hooks in one shared object, so LightningOptimizer (which forwards attribute reads, not writes) and
        # this optimizer always see the same values
        self._hooks = SimpleNamespace(first_pass_context=contextlib.nullcontext, second_pass_prelude=None,
                                      second_pass=False, window=[])
        self._perturbed: list[torch.Tensor] = []          # params moved by first_step, restored by second_step
        self._ready = True
        self._own_groups = []                          # torch's copy, unused from here on

    # ------------------------------------------------------------ sharing ---
    @property
    def param_groups(self) -> list[dict[str, Any]]:          # type: ignore[override]
        # getattr, not self.__dict__: Lightning's LightningOptimizer subclasses SAM and forwards attribute reads
        return self.base.param_groups if getattr(self, "_ready", False) else self._own_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        if getattr(self, "_ready", False):
            self.base.param_groups = groups
        else:
            self._own_groups = groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_ready", False):
            self.base.add_param_group(param_group)     # e.g. Lightning's BaseFinetuning unfreezing a layer
        else:
            super().add_param_group(param_group)

    @property
    def first_pass_context(self) -> Callable[[], ContextManager]:
        return self._hooks.first_pass_context

    @first_pass_context.setter
    def first_pass_context(self, fn: Callable[[], ContextManager]) -> None:
        self._hooks.first_pass_context = fn

    @property
    def second_pass_prelude(self) -> Optional[Callable[[], Any]]:
        return self._hooks.second_pass_prelude

    @second_pass_prelude.setter
    def second_pass_prelude(self, fn: Optional[Callable[[], Any]]) -> None:
        self._hooks.second_pass_prelude = fn

    @property
    def second_pass(self) -> bool:
        return self._hooks.second_pass

    @second_pass.setter
    def second_pass(self, value: bool) -> None:
        self._hooks.second_pass = value

    # -------------------------------------------------------------- steps ---
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """|| (|w| if adaptive else 1) * g || over all ``params``, in float32 (float64 for float64 gradients), a
        0-d tensor on the first parameter's device (no value read back to the host)."""
        grads = [p.grad for p in params]
        if self.adaptive:
            grads = torch._foreach_mul(torch._foreach_abs(params), grads)
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        norms = torch._foreach_norm(grads, 2, dtype=dtype)                 # one 0-d tensor per parameter
        device = params[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2)

    @torch.no_grad()
    def first_step(self) -> None:
        """w <- w + e_w for every parameter with a gradient (the others stay put: e_w = 0); keeps a copy of w."""
        params = self._params_with_grad()
        self._perturbed = params
        if not params:
            return
        scale = self.rho / (self.grad_norm(params) + 1e-12)                 # () float32
        saved = []                                                         # the copy second_step restores
        for p in params:
            w = self.state[p].get("w")
            if w is None or w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
                w = self.state[p]["w"] = torch.empty_like(p)               # allocated once, reused each step
            saved.append(w)
        torch._foreach_copy_(saved, params)
        grads = [p.grad for p in params]
        if all(g.device == scale.device for g in grads):
            e_w = torch._foreach_mul(grads, scale)                         # g * rho / ||.||, in the grads' dtype
        else:                                                              # parameters spread over devices
            e_w = [g * scale.to(g.device) for g in grads]
        if self.adaptive:
            torch._foreach_mul_(e_w, torch._foreach_mul(params, params))   # * w^2
        torch._foreach_add_(params, e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        """Put back the exact weights saved by :meth:`first_step`, then take the base optimizer's step with the
        gradients of the second pass."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self.state[p]["w"] for p in self._perturbed])
        self._perturbed = []
        self.base.step()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Two closure calls (gradients at w, then at w + e_w) and one base step; returns the first loss."""
        if closure is None:
            raise RuntimeError(NO_CLOSURE)
        closure = torch.enable_grad()(closure)
        with self.first_pass_context():
            loss = closure()
        self.first_step()
        self.zero_grad(set_to_none=True)
        if self.second_pass_prelude is not None:
            self.second_pass_prelude()
        self.second_pass = True
        try:
            closure()
        finally:
            self.second_pass = False
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------ gradient accumulation ---
    # With gradient accumulation the second pass needs the gradient of the whole accumulated batch at the perturbed
    # weights, but a training loop's closure recomputes only the window's last micro-batch. The loop hands every
    # first-pass micro-batch to remember(); arm() before the step makes the second pass replay the earlier ones
    # (the closure's own, the last, runs itself), without gradient sync, so the closure's backward all-reduces the
    # sum once; forget() after the step drops the window.
    def remember(self, batch: Any) -> None:
        """A first-pass micro-batch of the current accumulation window (the training step calls this)."""
        self._hooks.window.append(batch)

    def arm(self, replay: Callable[[Any], None], no_sync: Callable[[], ContextManager] = contextlib.nullcontext
            ) -> None:
        """Before the optimizer step: the first pass runs under ``no_sync`` (DDP's ``block_backward_sync``: each
        rank perturbs with its own gradient, the paper's m-sharpness); the second pass first replays the window's
        remembered micro-batches through ``replay(batch)`` (forward + backward, scaled by the accumulation), also
        under ``no_sync``. The window is taken now: the closure remembers its own micro-batch afresh."""
        window, self._hooks.window = self._hooks.window, []
        self.first_pass_context = no_sync

        def prelude() -> None:
            with no_sync():
                for batch in window:
                    replay(batch)

        self.second_pass_prelude = prelude if window else None

    def forget(self) -> None:
        """After the optimizer step: the window is over."""
        self._hooks.window = []

    # -------------------------------------------------------- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict: the perturbation only lives inside one step, nothing else to keep."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults / state / param_groups; SAM's groups live in its base (copy.deepcopy, pickle)
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.base).splitlines())
        return f"SAM(rho={self.rho}, adaptive={self.adaptive}, base=\n{inner}\n)"
