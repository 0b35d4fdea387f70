"""``probe.watch(model, optimizer)``: training telemetry from hooks, with no host sync.

Optimizer step hooks do the per-step work; forward hooks exist only on the
steps that collect activation statistics. Every number is computed on the
tensors' own device and packed into one small vector per step, which goes to
the sender thread as a single asynchronous copy (pinned memory + CUDA event on
GPU). Nothing here calls ``.item()``, ``.cpu()`` or synchronises.

What is collected, and how often, is documented in docs/watch.md.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from probe import internal, protocol, values

SubmitFn = Callable[[str, "int | None", Any], Any]


class Watcher:
    """Hooks on one model and optimizer; ``unwatch()`` removes every one of them."""

    def __init__(
        self,
        submit: SubmitFn,
        histogram: Callable[[str, Any, int | None], None],
        model: Any,
        optimizer: Any,
        *,
        log_every: int = 1,
        layer_every: int = 10,
        hist_every: int = 100,
        activations_every: int = 100,
        batch_size: int | None = None,
        tokens_per_step: int | None = None,
        start_step: int = 0,
    ) -> None:
        for label, every in (
            ("log_every", log_every),
            ("layer_every", layer_every),
            ("hist_every", hist_every),
            ("activations_every", activations_every),
        ):
            if every < 0:
                raise ValueError(f"{label} must be >= 0 (0 switches it off), got {every}")
        import torch

        self._torch = torch
        self._submit = submit
        self._histogram = histogram
        self.model = model
        self.optimizer = optimizer
        self.log_every = log_every
        self.layer_every = layer_every
        self.hist_every = hist_every
        self.activations_every = activations_every
        self.batch_size = batch_size
        self.tokens_per_step = tokens_per_step
        self.step = start_step
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._last_step_end: float | None = None
        self._data_wait = 0.0
        self._clip_coefficients: dict[int, Any] = {}  # param id -> this step's clip factor
        self._pre_clip_norms: dict[int, Any] = {}  # param id -> its gradient norm before clipping
        self._previous: list[Any] | None = None  # parameters before the step (update ratio)
        self._pending: tuple[list[str], Any] | None = None  # this step's gradient statistics
        self._activation_hooks: list[Any] = []
        self._activations: dict[str, Any] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        _clip_patch.add(self)
        if self._due(self.activations_every, self.step):
            self._add_activation_hooks()

    # -- public ------------------------------------------------------------------
    def unwatch(self) -> None:
        """Remove every hook; the model and optimizer are as they were."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_activation_hooks()
        _clip_patch.discard(self)

    def data(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Iterate ``loader``, timing how long each batch takes to arrive (data wait)."""
        iterator = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._data_wait += time.perf_counter() - started
            yield batch

    # -- optimizer hooks --------------------------------------------------------------
    def _due(self, every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Gradients are final here (accumulated, unscaled, maybe clipped)."""
        try:
            with self._torch.no_grad():
                self._collect_before_step()
        except Exception as exc:
            self._pending = None
            internal.record(exc, "watch: before step")
        finally:
            self._clip_coefficients = {}
            self._pre_clip_norms = {}

    def _collect_before_step(self) -> None:
        step = self.step
        if self._due(self.log_every, step) or self._due(self.layer_every, step):
            self._pending = self._gradient_stats(layers=self._due(self.layer_every, step))
        else:
            self._pending = None
        if self._due(self.layer_every, step):
            # A copy of the weights, to measure how far this step moves them.
            self._previous = list(
                self._torch._foreach_mul([p.detach() for p in self._params()], 1.0)
            )
        if self._due(self.hist_every, step):
            for param in self._params():
                name = self._names.get(id(param), "?")
                self._histogram(f"weights/{name}", param.detach(), step)
                if param.grad is not None and not param.grad.is_sparse:
                    self._histogram(f"grads/{name}", param.grad, step)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            with self._torch.no_grad():
                self._record_step()
        except Exception as exc:
            internal.record(exc, "watch: after step")
        finally:
            self.step += 1
            self._previous = None

    def _record_step(self) -> None:
        step = self.step
        now = time.perf_counter()
        body: dict[str, Any] = {}
        if self._last_step_end is not None:
            step_time = now - self._last_step_end
            body["step_time_seconds"] = step_time
            body["steps_per_second"] = 1.0 / max(step_time, 1e-9)
            if self.batch_size:
                body["samples_per_second"] = self.batch_size / max(step_time, 1e-9)
            if self.tokens_per_step:
                body["tokens_per_second"] = self.tokens_per_step / max(step_time, 1e-9)
        self._last_step_end = now
        if self._data_wait:
            body["data_wait_seconds"] = self._data_wait
            self._data_wait = 0.0
        if self._due(self.log_every, step):
            groups = self.optimizer.param_groups
            body["lr"] = _number(groups[0]["lr"])
            if len(groups) > 1:
                for index, group in enumerate(groups):
                    body[f"lr/group{index}"] = _number(group["lr"])
            body.update(self._cuda_memory())
        names: list[str] = []
        tensors: list[Any] = []
        if self._pending is not None:
            names.extend(self._pending[0])
            tensors.append(self._pending[1])
            self._pending = None
        if self._previous is not None:
            ratio_names, ratios = self._update_ratios(self._previous)
            names.extend(ratio_names)
            tensors.append(ratios)
        if self._activations:
            names.extend(name for key in self._activations for name in _activation_names(key))
            device = next(iter(self._activations.values())).device
            tensors.append(self._torch.cat([t.to(device) for t in self._activations.values()]))
            self._activations = {}
        self._remove_activation_hooks()
        if self._due(self.activations_every, step + 1):
            self._add_activation_hooks()
        if tensors:
            vector = self._torch.cat([t.float().reshape(-1).to(tensors[0].device) for t in tensors])
            captured = values.capture_tensor(vector)  # one async copy for the whole step
            # A record holds at most MAX_METRICS_PER_RECORD values: big models take several.
            room = protocol.MAX_METRICS_PER_RECORD - 64
            for start in range(0, len(names), room):
                part = values.CapturedVector(names[start : start + room], captured, start)
                if start == 0:
                    body["__watch__"] = part
                else:
                    self._submit(protocol.SCALARS, step, {"__watch__": part})
        if body:
            self._submit(protocol.SCALARS, step, body)

    # -- statistics (all on device) ---------------------------------------------------
    def _params(self) -> list[Any]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _gradient_stats(self, *, layers: bool) -> tuple[list[str], Any] | None:
        """Global, per-group and (if ``layers``) per-parameter gradient norms, pre-clip."""
        torch = self._torch
        groups = [
            [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
            for group in self.optimizer.param_groups
        ]
        grads = [p.grad for params in groups for p in params]
        if not grads:
            return None
        device = grads[0].device
        params = [p for group in groups for p in group]
        norms = self._pre_clip_gradient_norms(params, grads, device)
        names = ["grad_norm"]
        parts = [torch.linalg.vector_norm(norms).reshape(1)]
        start = 0
        multi = len(groups) > 1
        for index, params in enumerate(groups):
            if multi:
                names.append(f"grad_norm/group{index}")
                parts.append(
                    torch.linalg.vector_norm(norms[start : start + len(params)]).reshape(1)
                )
            start += len(params)
        names.append("grad_nonfinite")
        parts.append((~torch.isfinite(parts[0])).float())
        if layers:
            params = [p for group in groups for p in group]
            names.extend(f"grad_norm/layer/{self._names.get(id(p), '?')}" for p in params)
            parts.append(norms)
            weights = self._params()
            weight_norms = torch.stack(
                [n.to(device) for n in torch._foreach_norm([p.detach() for p in weights])]
            ).float()
            names.append("param_norm")
            parts.append(torch.linalg.vector_norm(weight_norms).reshape(1))
            names.extend(f"param_norm/layer/{self._names.get(id(p), '?')}" for p in weights)
            parts.append(weight_norms)
        return names, torch.cat(parts)

    def _pre_clip_gradient_norms(self, params: list[Any], grads: list[Any], device: Any) -> Any:
        """Each parameter's gradient norm before any clipping, as one float vector.

        Norms that ``clip_grad_norm_`` computed before clipping are reused (no second
        pass over the gradients); the others are computed here, and those a clip call
        scaled by a known factor are divided by it.
        """
        torch = self._torch
        known = self._pre_clip_norms
        norms: list[Any] = [known.get(id(p)) for p in params]
        missing = [i for i, norm in enumerate(norms) if norm is None]
        if missing:
            computed = torch._foreach_norm([grads[i] for i in missing])
            for i, norm in zip(missing, computed, strict=True):
                factor = self._clip_coefficients.get(id(params[i]))
                # clip_grad_norm_ scaled this gradient by a known factor: undo it.
                norms[i] = norm if factor is None else norm / factor.to(norm.device)
        return torch.stack([n.to(device) for n in norms]).float()

    def _update_ratios(self, previous: list[Any]) -> tuple[list[str], Any]:
        """||w_after - w_before|| / ||w_before|| per param group: how fast weights move."""
        torch = self._torch
        names, parts = [], []
        offset = 0
        for index, group in enumerate(self.optimizer.param_groups):
            params = list(group["params"])
            before = previous[offset : offset + len(params)]
            offset += len(params)
            if not params:
                continue
            delta = torch._foreach_sub([p.detach() for p in params], before)
            device = params[0].device
            moved = torch.linalg.vector_norm(
                torch.stack([n.to(device) for n in torch._foreach_norm(delta)])
            )
            size = torch.linalg.vector_norm(
                torch.stack([n.to(device) for n in torch._foreach_norm(before)])
            )
            names.append(f"update_ratio/group{index}")
            parts.append((moved / (size + 1e-12)).reshape(1))
        return names, torch.cat(parts) if parts else torch.zeros(0)

    def _cuda_memory(self) -> dict[str, int]:
        """Allocator counters: host-side bookkeeping, no device sync."""
        torch = self._torch
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        return {
            "cuda_memory_allocated_bytes": torch.cuda.memory_allocated(),
            "cuda_memory_reserved_bytes": torch.cuda.memory_reserved(),
            "cuda_memory_peak_bytes": torch.cuda.max_memory_allocated(),
        }

    # -- activations ----------------------------------------------------------------------
    def _add_activation_hooks(self) -> None:
        for name, module in self.model.named_modules():
            if name and not any(True for _ in module.children()):
                hook = module.register_forward_hook(_activation_hook(self, name))
                self._activation_hooks.append(hook)

    def _remove_activation_hooks(self) -> None:
        for hook in self._activation_hooks:
            hook.remove()
        self._activation_hooks.clear()

    def _take_activation(self, name: str, output: Any) -> None:
        if not self._torch.is_grad_enabled():
            return  # an evaluation forward between steps
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(tensor, self._torch.Tensor) or not tensor.is_floating_point():
            return
        x = tensor.detach().float()
        self._activations[name] = self._torch.stack(
            [x.mean(), x.std() if x.numel() > 1 else x.new_zeros(()), (x == 0).float().mean()]
        )
        # A sample of the output itself (<= 8,192 values, gathered on its device).
        self._histogram(f"activations/{name}", tensor.detach(), self.step)


def _number(value: Any) -> Any:
    """A learning rate as a float, or captured if it is a tensor (no sync for a CUDA lr)."""
    return values.capture_tensor(value) if values.is_tensor(value) else float(value)


def _activation_names(module: str) -> list[str]:
    return [f"act/{module}/mean", f"act/{module}/std", f"act/{module}/zero_fraction"]


def _activation_hook(watcher: Watcher, name: str) -> Callable[..., None]:
    ref = weakref.ref(watcher)

    def hook(module: Any, inputs: Any, output: Any) -> None:
        owner = ref()
        if owner is None:
            return
        try:
            owner._take_activation(name, output)
        except Exception as exc:
            internal.record(exc, "watch: activation")

    return hook


class _ClipPatch:
    """Sees ``clip_grad_norm_`` calls, so the logged norm is the one before clipping.

    ``torch.nn.utils.clip_grad_norm_`` returns the pre-clip total norm (a tensor,
    no sync); the watcher whose parameters were clipped keeps it for its step.
    Installed while any watcher exists; code that imported the function by name
    before ``probe.watch`` keeps the original (documented).
    """

    def __init__(self) -> None:
        self.watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        self.original: Any = None

    def add(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)
        if self.original is None:
            import torch.nn.utils
            import torch.nn.utils.clip_grad

            self.original = torch.nn.utils.clip_grad_norm_
            torch.nn.utils.clip_grad_norm_ = self._clip
            torch.nn.utils.clip_grad.clip_grad_norm_ = self._clip

    def discard(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers and self.original is not None:
            import torch.nn.utils
            import torch.nn.utils.clip_grad

            torch.nn.utils.clip_grad_norm_ = self.original
            torch.nn.utils.clip_grad.clip_grad_norm_ = self.original
            self.original = None

    def _clip(self, parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        import torch

        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        if not args and not kwargs:
            total = self._clip_reusing_norms(parameters, max_norm)
            if total is not None:
                return total
        total = self.original(parameters, max_norm, *args, **kwargs)
        try:
            # The factor clip_grad_norm_ applied, as a tensor: no sync.
            factor = torch.clamp(float(max_norm) / (total.detach().float() + 1e-6), max=1.0)
            for watcher in list(self.watchers):
                for param in parameters:
                    if id(param) in watcher._names:
                        watcher._clip_coefficients[id(param)] = factor
        except Exception as exc:
            internal.record(exc, "watch: clip")
        return total

    def _clip_reusing_norms(self, parameters: list[Any], max_norm: float) -> Any:
        """``clip_grad_norm_(parameters, max_norm)`` as torch computes it (2-norm: one
        ``_foreach_norm`` over the gradients, their stacked norm, ``clip_grads_with_norm_``),
        keeping the per-parameter norms for the watchers: the watcher then needs no second
        pass over every gradient. None (do it the usual way) for gradients of several
        devices or dtypes, sparse ones, or a torch without ``clip_grads_with_norm_``."""
        import torch

        clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
        with_grad = [p for p in parameters if p.grad is not None]
        if clip_with_norm is None or not with_grad:
            return None
        grads = [p.grad for p in with_grad]
        first = grads[0]
        if any(g.is_sparse or g.device != first.device or g.dtype != first.dtype for g in grads):
            return None
        with torch.no_grad():
            norms = torch._foreach_norm(grads)
            total = torch.linalg.vector_norm(torch.stack(norms))
            clip_with_norm(parameters, max_norm, total)
        try:
            for watcher in list(self.watchers):
                for param, norm in zip(with_grad, norms, strict=True):
                    if id(param) in watcher._names:
                        watcher._pre_clip_norms[id(param)] = norm
        except Exception as exc:
            internal.record(exc, "watch: clip")
        return total


_clip_patch = _ClipPatch()
