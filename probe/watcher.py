"""``probe.watch(model, optimizer)``: training telemetry from hooks, with no host sync.

Optimizer step hooks do the per-step work. Without an optimizer (a hand-written
update), the model's parameters say when a backward has left its gradients
final, and the next training forward closes the step. Two forward hooks on the model time
its forward passes (two ``time.perf_counter()`` calls per forward); the other
forward hooks exist only on the steps that collect activation statistics.
Every number is computed on the tensors' own device and packed into one small
vector per step, which goes to the sender thread as a single asynchronous copy
(pinned memory + CUDA event on GPU). Nothing here calls ``.item()``, ``.cpu()`` or synchronises.

What is collected, and how often, is documented in docs/watch.md.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from probe import internal, protocol, values

SubmitFn = Callable[[str, "int | None", Any], Any]


def check_every(log_every: int, layer_every: int, hist_every: int, activations_every: int) -> None:
    """A negative interval is a set-up mistake: ``ValueError`` naming it."""
    for label, every in (
        ("log_every", log_every),
        ("layer_every", layer_every),
        ("hist_every", hist_every),
        ("activations_every", activations_every),
    ):
        if every < 0:
            raise ValueError(f"{label} must be >= 0 (0 switches it off), got {every}")


class Watcher:
    """Hooks on one model and optimizer (or the model alone, ``optimizer=None``);
    ``unwatch()`` removes every one of them."""

    def __init__(
        self,
        submit: SubmitFn,
        histograms: Callable[[list[str], list[Any], int | None], None],
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
        check_every(log_every, layer_every, hist_every, activations_every)
        import torch

        self._torch = torch
        self._submit = submit
        self._histograms = histograms
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
        # Without an optimizer, one group of the model's trainable parameters stands in for
        # its param groups.
        self._model_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self._gradients_final = False  # a backward has ended since the last step (no optimizer)
        self._in_backward = False  # its end is queued with the autograd engine (no optimizer)
        self._last_step_end: float | None = None
        self._data_wait = 0.0
        self._clip_coefficients: dict[int, Any] = {}  # param id -> this step's clip factor
        self._clips: list[_Clip] = []  # this step's norm-reusing clip_grad_norm_ calls
        self._layouts: dict[tuple[Any, ...], _Layout] = {}
        self._previous: list[Any] | None = None  # weights before the step (update ratio)
        self._weight_norms: tuple[Any, _Layout] | None = None  # their norms, per parameter
        self._pending: tuple[_GradientNorms, Any] | None = None  # this step's gradient norms
        self._activation_hooks: list[Any] = []
        self._activations: dict[str, Any] = {}
        self._activation_samples: dict[str, Any] = {}  # histogram name -> bounded sample
        self._forward_started = 0.0
        self._forward_seconds = 0.0  # this step's grad-enabled forwards, summed
        self._forwards_total = 0.0  # every forward's time since watch, evaluations included
        self._backward_started: float | None = None  # when this step's first backward began
        self._forwards_at_backward = 0.0  # _forwards_total then
        self._backward_seconds: float | None = None
        self._handles: list[Any] = []
        self._timing: list[Any] = []  # the section timer's two hooks (also in _handles)
        try:
            self._add_hooks()
        except BaseException:
            self.unwatch()  # nothing half-hooked stays behind
            raise

    def _add_hooks(self) -> None:
        if self.optimizer is not None:
            self._handles += [
                self.optimizer.register_step_pre_hook(self._before_step),
                self.optimizer.register_step_post_hook(self._after_step),
            ]
        else:
            self._handles += [
                p.register_post_accumulate_grad_hook(self._gradient_accumulated)
                for p in self._model_groups[0]["params"]
            ]
        # The inner module of a DDP/FSDP wrapper: its forward is the user's compute, without
        # the wrapper's own pre-forward work (buffer broadcasts, bucket rebuilds).
        timed = getattr(self.model, "module", self.model)
        if hasattr(timed, "register_forward_pre_hook"):
            self._timing = [
                timed.register_forward_pre_hook(self._forward_begins),
                timed.register_forward_hook(self._forward_ends),
            ]
            self._handles += self._timing
        _clip_patch.add(self)
        if self._due(self.activations_every, self.step):
            self._add_activation_hooks()

    # -- public ------------------------------------------------------------------
    def unwatch(self) -> None:
        """Remove every hook; the model and optimizer are as they were. Without an
        optimizer, the step whose gradients are final is recorded first."""
        if self._gradients_final:
            self._end_step(timed=False)
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

    # -- section timing (every forward: keep these small) --------------------------------
    def _forward_begins(self, module: Any, args: Any) -> None:
        if self._gradients_final:  # only without an optimizer: maybe the next step's forward
            self._next_forward(module)
        self._forward_started = time.perf_counter()

    def _forward_ends(self, module: Any, args: Any, output: Any) -> None:
        """Adds a training forward's host time; before the step's first backward, hooks its
        output's gradient to see that backward begin. Evaluation (no_grad) forwards are not
        counted: a rank that evaluates would look slow."""
        elapsed = time.perf_counter() - self._forward_started
        self._forwards_total += elapsed
        try:
            if not self._torch.is_grad_enabled():
                return
            self._forward_seconds += elapsed
            if self._backward_started is None:
                tensor = _first_grad_tensor(output, self._torch.Tensor)
                if tensor is not None:
                    tensor.register_hook(self._backward_begins)
        except Exception as exc:
            internal.record(exc, "watch: forward timing")

    def _backward_begins(self, grad: Any) -> None:
        if self._backward_started is None:
            self._backward_started = time.perf_counter()
            self._forwards_at_backward = self._forwards_total

    # -- steps without an optimizer ----------------------------------------------------
    def _gradient_accumulated(self, param: Any) -> None:
        """A parameter's gradient is accumulated: the first of a backward asks the autograd
        engine to call back when the whole backward is done."""
        if self._in_backward:
            return
        try:
            self._torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)
            self._in_backward = True
        except Exception as exc:
            internal.record(exc, "watch: backward")

    def _backward_ends(self) -> None:
        """Gradients are final (and not yet clipped): their norms, and the weights before
        the update, are taken now; the step is recorded at the next training forward."""
        self._in_backward = False
        if self._backward_started is not None:
            forwards = self._forwards_total - self._forwards_at_backward
            self._backward_seconds = time.perf_counter() - self._backward_started - forwards
        first = not self._gradients_final
        self._gradients_final = True
        # Clip calls seen so far came before this backward: not this step's.
        self._clip_coefficients = {}
        self._clips = []
        try:
            with self._torch.no_grad():
                self._collect_before_step(histograms=first)
        except Exception as exc:
            self._pending = None
            internal.record(exc, "watch: backward end")

    def _next_forward(self, module: Any) -> None:
        """A forward with gradients on, in training mode, after a backward: the update is
        done, so the previous step ends here. Evaluation forwards leave it open."""
        try:
            if self._torch.is_grad_enabled() and getattr(module, "training", True):
                self._end_step(timed=True)
        except Exception as exc:
            internal.record(exc, "watch: step end")

    def _end_step(self, timed: bool) -> None:
        self._gradients_final = False
        self._backward_started = None
        self._clip_coefficients = {}
        self._clips = []
        if not timed:
            self._last_step_end = None  # unwatch: the time since the last step is no step's
        self._after_step(None, (), {})

    # -- optimizer hooks --------------------------------------------------------------
    def _due(self, every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        """Gradients are final here (accumulated, unscaled, maybe clipped), unless the step
        is given a closure (Lightning's, LBFGS's): the closure runs the forward and the
        backward inside ``step``, so the gradients are taken when it first returns."""
        try:
            closed = _with_closure(optimizer, args, kwargs, self._measured)
        except Exception as exc:
            closed = None
            internal.record(exc, "watch: closure")
        if closed is not None:
            return closed
        self._gradients_ready()
        return None

    def _measured(self, closure: Callable[..., Any]) -> Callable[..., Any]:
        """``closure``, followed on its first call by what ``_before_step`` does."""
        first = True

        def measured(*args: Any, **kwargs: Any) -> Any:
            nonlocal first
            result = closure(*args, **kwargs)
            if first:
                first = False
                self._gradients_ready()
            return result

        return measured

    def _gradients_ready(self) -> None:
        if self._backward_started is not None:
            # From the first backward to now, less the forwards in between (accumulation,
            # evaluation).
            forwards = self._forwards_total - self._forwards_at_backward
            self._backward_seconds = time.perf_counter() - self._backward_started - forwards
            self._backward_started = None
        try:
            with self._torch.no_grad():
                self._collect_before_step()
        except Exception as exc:
            self._pending = None
            internal.record(exc, "watch: before step")
        finally:
            self._clip_coefficients = {}
            self._clips = []

    def _collect_before_step(self, histograms: bool = True) -> None:
        step = self.step
        layers = self._due(self.layer_every, step)
        if self._due(self.log_every, step) or layers:
            norms = self._gradient_norms()
            if norms is None:
                self._pending = None
            else:
                vector, layout = norms
                self._pending = (_GradientNorms(layout, layers), vector)
        else:
            self._pending = None
        if layers:
            # A copy of the weights, to measure how far this step moves them, and their norms.
            params = self._params()
            self._previous = list(self._torch._foreach_mul([p.detach() for p in params], 1.0))
            layout = self._layout(params)
            self._weight_norms = (self._stack(self._previous, layout), layout)
        if histograms and self._due(self.hist_every, step):
            names, samples = [], []
            limit = values.HISTOGRAM_SAMPLE
            for param in self._params():
                name = self._names.get(id(param), "?")
                names.append(f"weights/{name}")
                samples.append(values.sample_tensor(param.detach(), limit))
                if param.grad is not None and not param.grad.is_sparse:
                    names.append(f"grads/{name}")
                    samples.append(values.sample_tensor(param.grad, limit))
            # Concatenated (copied) now, before the optimizer changes the weights.
            self._histograms(names, samples, step)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            with self._torch.no_grad():
                self._record_step()
        except Exception as exc:
            internal.record(exc, "watch: after step")
        finally:
            self.step += 1
            self._previous = None
            self._weight_norms = None

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
        if self._forward_seconds:
            body["forward_seconds"] = self._forward_seconds
            self._forward_seconds = 0.0
        if self._backward_seconds is not None:
            body["backward_seconds"] = self._backward_seconds
            self._backward_seconds = None
        if self._due(self.log_every, step):
            if self.optimizer is not None:
                groups = self.optimizer.param_groups
                body["lr"] = _number(groups[0]["lr"])
                if len(groups) > 1:
                    for index, group in enumerate(groups):
                        body[f"lr/group{index}"] = _number(group["lr"])
            body.update(self._cuda_memory())
        sections: list[_Section] = []
        tensors: list[Any] = []
        if self._pending is not None:
            section, norms = self._pending
            self._pending = None
            sections.append(section)
            tensors.append(norms)
        if self._previous is not None and self._weight_norms is not None:
            weight_norms, layout = self._weight_norms
            # before - after, in place in the copy: the norms of this step's update.
            self._torch._foreach_sub_(self._previous, [p.detach() for p in self._params()])
            sections.append(_WeightNorms(layout))
            tensors.extend((weight_norms, self._stack(self._previous, layout)))
        if self._activations:
            sums = [stacked for stacked, _ in self._activations.values()]
            sizes = [size for _, size in self._activations.values()]
            sections.append(_ActivationStats(list(self._activations), sizes))
            tensors.append(self._torch.cat([t.to(sums[0].device) for t in sums]))
            self._activations = {}
        if self._activation_samples:
            samples, self._activation_samples = self._activation_samples, {}
            self._histograms(list(samples), list(samples.values()), step)
        self._remove_activation_hooks()
        if self._due(self.activations_every, step + 1):
            self._add_activation_hooks()
        if tensors:
            if len(tensors) == 1:
                vector = tensors[0]
            else:
                device = tensors[0].device
                vector = self._torch.cat([t.float().reshape(-1).to(device) for t in tensors])
            # One async copy for the whole step; names and sums come on the sender thread.
            derive = _StepMetrics(sections)
            step_vector = values.StepVector(values.capture_fresh(vector), derive)
            # A record holds at most MAX_METRICS_PER_RECORD values: big models take several.
            room = protocol.MAX_METRICS_PER_RECORD - 64
            for start in range(0, derive.count(), room):
                part = values.CapturedVector(step_vector, start, start + room)
                if start == 0:
                    body["__watch__"] = part
                else:
                    self._submit(protocol.SCALARS, step, {"__watch__": part})
        if body:
            self._submit(protocol.SCALARS, step, body)

    # -- statistics (all on device) ---------------------------------------------------
    def _param_groups(self) -> list[Any]:
        """The optimizer's param groups, or the model's trainable parameters as one group."""
        return self.optimizer.param_groups if self.optimizer is not None else self._model_groups

    def _params(self) -> list[Any]:
        return [p for group in self._param_groups() for p in group["params"]]

    def _gradient_norms(self) -> tuple[Any, _Layout] | None:
        """Each parameter's gradient norm before any clipping: one float vector, and its layout.

        A ``clip_grad_norm_`` call over all of this optimizer's parameters has
        already stacked those norms: that vector is used as it is (no torch op
        here). Otherwise norms a clip call computed are reused, the rest computed,
        and those a clip call scaled by a known factor divided by it.
        """
        if len(self._clips) == 1:
            clip = self._clips[0]
            if all(id(p) in clip.ids for p in self._params()):
                return clip.norms, self._layout(clip.params)
        torch = self._torch
        params = [
            p
            for group in self._param_groups()
            for p in group["params"]
            if p.grad is not None and not p.grad.is_sparse
        ]
        if not params:
            return None
        known: dict[int, Any] = {}
        for clip in self._clips:
            for param, norm in zip(clip.params, clip.norms, strict=True):
                known.setdefault(id(param), norm)  # the first clip saw the gradient unclipped
        norms: list[Any] = [known.get(id(p)) for p in params]
        missing = [i for i, norm in enumerate(norms) if norm is None]
        if missing:
            computed = torch._foreach_norm([params[i].grad for i in missing])
            for i, norm in zip(missing, computed, strict=True):
                factor = self._clip_coefficients.get(id(params[i]))
                # clip_grad_norm_ scaled this gradient by a known factor: undo it.
                norms[i] = norm if factor is None else norm / factor.to(norm.device)
        layout = self._layout(params)
        device = params[0].device
        return torch.stack([n.to(device) for n in norms]).float(), layout

    def _layout(self, params: list[Any]) -> _Layout:
        """Names and param groups of a vector with one entry per tensor of ``params``."""
        groups = self._param_groups()
        key = (len(groups), *map(id, params))
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 16:
                self._layouts.clear()  # parameter sets that change every step: stay bounded
            layout = _Layout(params, self._names, groups)
            self._layouts[key] = layout
        return layout

    def _stack(self, tensors: list[Any], layout: _Layout) -> Any:
        """One norm per tensor, stacked as one float vector on the first tensor's device."""
        norms = list(self._torch._foreach_norm(tensors))
        if not layout.one_device:
            device = tensors[0].device
            norms = [n.to(device) for n in norms]
        return self._torch.stack(norms).float()

    def _cuda_memory(self) -> dict[str, int]:
        """Allocator counters of the device the model trains on (its first parameter's):
        host-side bookkeeping, no device sync. One read of the allocator's stats, not
        ``memory_allocated()`` and friends, each of which flattens and sorts all of them."""
        first = next((p for group in self._param_groups() for p in group["params"]), None)
        if first is None or not first.is_cuda:
            return {}
        stats = self._torch.cuda.memory_stats_as_nested_dict(first.device)
        if not stats:
            return {}  # CUDA not initialised yet
        allocated = stats.get("allocated_bytes", {}).get("all", {})
        reserved = stats.get("reserved_bytes", {}).get("all", {})
        return {  # the keys torch.cuda.memory_allocated / _reserved / max_memory_allocated read
            "cuda_memory_allocated_bytes": allocated.get("current", 0),
            "cuda_memory_reserved_bytes": reserved.get("current", 0),
            "cuda_memory_peak_bytes": allocated.get("peak", 0),
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
        torch = self._torch
        x = tensor.detach()
        # A sample of the output itself (<= 8,192 values, taken on its device), shipped
        # with the others after the step: copied, as later layers may change x in place.
        sample = values.sample_tensor(x, values.HISTOGRAM_SAMPLE).to(torch.float32, copy=True)
        self._activation_samples[f"activations/{name}"] = sample
        # Sums the sender thread derives mean, std and zero fraction from: two reductions
        # and a norm of x less the sample's mean, about a quarter of what x.std() and
        # (x == 0).mean() cost. Centring on that mean keeps the std exact when the mean
        # dwarfs it (a saturated sigmoid), where a plain sum of squares would lose it.
        # Non-zeros are counted as |sign(x)| summed: count_nonzero branches per value and,
        # on CPU, is 5-10x slower on a ReLU's half-zero output (sign(NaN) is 0).
        shift = sample.mean()
        sums = [
            x.sum(dtype=torch.float32),
            torch.linalg.vector_norm(x.float() - shift),  # in bf16, x - shift is biased
            x.sign().abs_().sum(dtype=torch.float32),
            shift,
        ]
        self._activations[name] = (torch.stack(sums), x.numel())


def _number(value: Any) -> Any:
    """A learning rate as a float, or captured if it is a tensor (no sync for a CUDA lr)."""
    return values.capture_tensor(value) if values.is_tensor(value) else float(value)


def _first_grad_tensor(output: Any, tensor_type: Any) -> Any:
    """The tensor of a forward's output whose gradient marks the start of the backward:
    the output itself, or the first tensor of a tuple, list or mapping (a ``ModelOutput``
    puts ``loss`` first) that requires grad. A tensor hook, unlike a module's full backward
    hook, leaves the output free to be changed in place (logits masked, say)."""
    if isinstance(output, tensor_type):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        items: Iterable[Any] = output
    elif isinstance(output, Mapping):
        items = output.values()
    else:
        return None
    for item in items:
        if isinstance(item, tensor_type) and item.requires_grad:
            return item
    return None


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
    """Sees ``clip_grad_norm_`` and ``clip_grads_with_norm_`` calls, so the logged norm is
    the one before clipping.

    ``torch.nn.utils.clip_grad_norm_`` returns the pre-clip total norm (a tensor,
    no sync); the watcher whose parameters were clipped keeps it for its step.
    ``torch.nn.utils.clip_grads_with_norm_`` (what accelerate's
    ``clip_grad_norm_``, and so the Hugging Face Trainer, clips with, after
    ``get_total_norm``) is given that norm: the factor it scales by is kept.
    Installed while any watcher exists; code that imported a function by name
    before ``probe.watch`` keeps the original (documented).
    """

    def __init__(self) -> None:
        self.watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        self.original: Any = None
        self.original_with_norm: Any = None  # None too on a torch without it (< 2.6)

    def add(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)
        if self.original is None:
            import torch.nn.utils
            import torch.nn.utils.clip_grad

            self.original = torch.nn.utils.clip_grad_norm_
            torch.nn.utils.clip_grad_norm_ = self._clip
            torch.nn.utils.clip_grad.clip_grad_norm_ = self._clip
            # Only the public name: torch's own clip_grad_norm_ calls the private one.
            self.original_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
            if self.original_with_norm is not None:
                torch.nn.utils.clip_grads_with_norm_ = self._clip_with_norm

    def discard(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers and self.original is not None:
            import torch.nn.utils
            import torch.nn.utils.clip_grad

            torch.nn.utils.clip_grad_norm_ = self.original
            torch.nn.utils.clip_grad.clip_grad_norm_ = self.original
            if self.original_with_norm is not None:
                torch.nn.utils.clip_grads_with_norm_ = self.original_with_norm
            self.original = self.original_with_norm = None

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
        self._note_factor(parameters, max_norm, total)
        return total

    def _clip_with_norm(
        self, parameters: Any, max_norm: float, total_norm: Any, *args: Any, **kwargs: Any
    ) -> None:
        """``clip_grads_with_norm_`` as torch does it, keeping the factor it scaled by."""
        import torch

        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        self.original_with_norm(parameters, max_norm, total_norm, *args, **kwargs)
        self._note_factor(parameters, max_norm, total_norm)

    def _note_factor(self, parameters: list[Any], max_norm: float, total: Any) -> None:
        """The factor a clip scaled ``parameters``' gradients by (torch's formula), as a
        tensor (no sync), for each watcher that has them to undo."""
        import torch

        try:
            if not isinstance(total, torch.Tensor):
                total = torch.tensor(float(total))
            factor = torch.clamp(float(max_norm) / (total.detach().float() + 1e-6), max=1.0)
            for watcher in list(self.watchers):
                for param in parameters:
                    if id(param) in watcher._names:
                        watcher._clip_coefficients[id(param)] = factor
        except Exception as exc:
            internal.record(exc, "watch: clip")

    def _clip_reusing_norms(self, parameters: list[Any], max_norm: float) -> Any:
        """``clip_grad_norm_(parameters, max_norm)`` as torch computes it (2-norm: one
        ``_foreach_norm`` over the gradients, their stacked norm, ``clip_grads_with_norm_``),
        keeping the per-parameter norms for the watchers: the watcher then needs no second
        pass over every gradient. None (do it the usual way) for gradients of several
        devices or dtypes, sparse ones, or a torch without ``clip_grads_with_norm_``."""
        import torch

        clip_with_norm = self.original_with_norm
        with_grad = [p for p in parameters if p.grad is not None]
        if clip_with_norm is None or not with_grad:
            return None
        grads = [p.grad for p in with_grad]
        first = grads[0]
        if any(g.is_sparse or g.device != first.device or g.dtype != first.dtype for g in grads):
            return None
        with torch.no_grad():
            norms = torch._foreach_norm(grads)
            stacked = torch.stack(norms)
            total = torch.linalg.vector_norm(stacked)
            clip_with_norm(parameters, max_norm, total)
        try:
            clip = _Clip(with_grad, stacked.float(), {id(p) for p in parameters})
            for watcher in list(self.watchers):
                watcher._clips.append(clip)
        except Exception as exc:
            internal.record(exc, "watch: clip")
        return total


class _Clip:
    """One norm-reusing ``clip_grad_norm_`` call: its gradients' norms before clipping."""

    __slots__ = ("ids", "norms", "params")

    def __init__(self, params: list[Any], norms: Any, ids: set[int]) -> None:
        self.params = params  # the parameters that had a gradient, in the vector's order
        self.norms = norms  # their pre-clip norms, one float vector
        self.ids = ids  # every parameter the call was given


class _Layout:
    """Where this optimizer's parameters sit in a vector with one entry per tensor.

    ``positions`` are the entries of the optimizer's parameters (a clip call may
    also have covered others), ``names`` their names, ``groups`` the entries of
    each param group. Built once per set of tensors (the watcher caches it), so a
    step only looks it up.
    """

    __slots__ = ("count", "grad_names", "groups", "names", "one_device", "param_names", "positions")

    def __init__(self, params: list[Any], names: dict[int, str], groups: list[Any]) -> None:
        group_of = {id(p): index for index, group in enumerate(groups) for p in group["params"]}
        self.count = len(params)
        self.positions = [i for i, p in enumerate(params) if id(p) in group_of]
        self.names = [names.get(id(params[i]), "?") for i in self.positions]
        self.grad_names = [f"grad_norm/layer/{name}" for name in self.names]
        self.param_names = [f"param_norm/layer/{name}" for name in self.names]
        self.groups: list[list[int]] = [[] for _ in groups]
        for position in self.positions:
            self.groups[group_of[id(params[position])]].append(position)
        self.one_device = len({p.device for p in params}) <= 1


class _GradientNorms:
    """A step vector's section of pre-clip gradient norms, one per parameter: the global
    and per-group norms and the non-finite flag, with ``layers`` each norm too."""

    def __init__(self, layout: _Layout, layers: bool) -> None:
        self.layout = layout
        self.layers = layers
        self.size = layout.count
        multi = len(layout.groups) > 1
        self.count = 2 + (len(layout.groups) if multi else 0)
        self.count += len(layout.positions) if layers else 0

    def metrics(self, norms: list[float]) -> list[tuple[str, float]]:
        layout = self.layout
        mine = [norms[i] for i in layout.positions]
        total = _root_sum_squares(mine)
        out = [("grad_norm", total)]
        if len(layout.groups) > 1:
            out.extend(
                (f"grad_norm/group{index}", _root_sum_squares([norms[i] for i in group]))
                for index, group in enumerate(layout.groups)
            )
        out.append(("grad_nonfinite", 0.0 if math.isfinite(total) else 1.0))
        if self.layers:
            out.extend(zip(layout.grad_names, mine, strict=True))
        return out


class _WeightNorms:
    """A section of each parameter's norm before the step, then the norm of its update:
    the weight norms and the update-to-weight ratio per group."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.size = 2 * layout.count
        self.count = 1 + len(layout.positions) + sum(1 for group in layout.groups if group)

    def metrics(self, numbers: list[float]) -> list[tuple[str, float]]:
        layout = self.layout
        weights, moves = numbers[: layout.count], numbers[layout.count :]
        out = [("param_norm", _root_sum_squares(weights))]
        out.extend(zip(layout.param_names, weights, strict=True))  # every weight is the optimizer's
        for index, group in enumerate(layout.groups):
            if group:
                moved = _root_sum_squares([moves[i] for i in group])
                size = _root_sum_squares([weights[i] for i in group])
                out.append((f"update_ratio/group{index}", moved / (size + 1e-12)))
        return out


class _ActivationStats:
    """A section of four sums for each module's output of ``sizes`` elements: its sum, the
    norm of its difference from ``shift``, its non-zero count and ``shift``. They make the
    mean, the std (unbiased, as ``Tensor.std``) and the zero fraction."""

    def __init__(self, modules: list[str], sizes: list[int]) -> None:
        self.names = [name for module in modules for name in _activation_names(module)]
        self.sizes = sizes
        self.size = 4 * len(sizes)
        self.count = len(self.names)

    def metrics(self, numbers: list[float]) -> list[tuple[str, float]]:
        out: list[float] = []
        for index, size in enumerate(self.sizes):
            total, spread, nonzero, shift = numbers[4 * index : 4 * index + 4]
            mean = total / size
            std = 0.0
            if size > 1:
                offset = mean - shift  # small: the shift is the mean of a sample
                variance = (spread * spread / size - offset * offset) * size / (size - 1)
                std = 0.0 if variance < 0 else math.sqrt(variance)  # NaN stays NaN
            out.extend((mean, std, 1.0 - nonzero / size))
        return list(zip(self.names, out, strict=True))


_Section = _GradientNorms | _WeightNorms | _ActivationStats


class _StepMetrics:
    """Names a step vector's numbers and derives the sums (sender thread, plain floats).

    ``sections`` say what the vector holds, in order; each takes its ``size``
    numbers and makes its ``count`` metrics.
    """

    def __init__(self, sections: list[_Section]) -> None:
        self.sections = sections

    def count(self) -> int:
        """How many metrics ``__call__`` returns (known on the training thread)."""
        return sum(section.count for section in self.sections)

    def __call__(self, numbers: list[float]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        at = 0
        for section in self.sections:
            out.extend(section.metrics(numbers[at : at + section.size]))
            at += section.size
        return out


def _root_sum_squares(norms: list[float]) -> float:
    """The norm of the concatenation of tensors, from their norms."""
    return math.sqrt(sum(n * n for n in norms))


_clip_patch = _ClipPatch()


def _with_closure(
    optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], wrap: Callable[[Any], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A step pre-hook's new ``(args, kwargs)`` with the step's closure (keyword, or the
    first argument after the optimizer itself, which torch passes first) wrapped; None
    when the step has no closure."""
    if callable(kwargs.get("closure")):
        return args, {**kwargs, "closure": wrap(kwargs["closure"])}
    first = 1 if args and args[0] is optimizer else 0
    if len(args) > first and callable(args[first]):
        return (*args[:first], wrap(args[first]), *args[first + 1 :]), kwargs
    return None


# Attributes under which training frameworks keep the optimizer they wrap: accelerate's
# AcceleratedOptimizer and DeepSpeed's engine (``optimizer``), Lightning's
# LightningOptimizer (``_optimizer``).
_WRAPPED_AS = ("optimizer", "_optimizer")


def find_optimizer(optimizer: Any, levels: int = 4) -> Any:
    """The torch optimizer that runs step hooks: ``optimizer`` itself, or the one it wraps
    (``levels`` deep at most); None when there is none. A wrapper that subclasses
    ``torch.optim.Optimizer`` without running its ``__init__`` (accelerate's) has the
    hook methods but would never call the hooks: it is looked through."""
    for _ in range(levels + 1):
        if optimizer is None:
            return None
        if _runs_step_hooks(optimizer):
            return optimizer
        optimizer = next(
            (
                inner
                for name in _WRAPPED_AS
                if (inner := getattr(optimizer, name, None)) is not None
            ),
            None,
        )
    return None


def _runs_step_hooks(optimizer: Any) -> bool:
    return (
        callable(getattr(optimizer, "register_step_pre_hook", None))
        and isinstance(getattr(optimizer, "_optimizer_step_pre_hooks", None), dict)
        and isinstance(getattr(optimizer, "param_groups", None), list)
    )
