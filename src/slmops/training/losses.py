"""`--loss`: the built-in losses by name, or the user's own `torch.nn.Module` named as FILE.py:ClassName.

Every loss is called as `loss(outputs, batch)` and returns the batch's mean loss as a scalar tensor:
`outputs` is what the model returned, `batch` the collator's tensors, `labels` included. A loss that
needs more from the model says so in a class attribute, `model_kwargs` (the contrastive loss asks for
`output_hidden_states`).

How the batch reaches the loss: transformers' `compute_loss_func` hook is called with the outputs, the
labels and a token count, never with the batch, and a pair loss cannot pool without the attention
mask. `use_loss` therefore replaces `compute_loss` on the one Trainer object of the run (no Trainer
subclass): the model runs on the batch without its labels, the loss gets both. The default loss,
token cross-entropy, keeps the stock `compute_loss_func` path untouched, as fast as before.

The user's file is imported from where the user put it, and only from there; any exception raised in
it (at import, in `__init__`, in `forward`) becomes one line naming the file and the line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slmops.errors import UsageError
from slmops.training.speed.logits import supervised_logits

USER_MODULE = "slmops_user_loss"  # prefix of the module names user files are imported under


class LabelSmoothing(nn.Module):
    """Token cross-entropy against a target that keeps `smoothing` of its mass spread over the whole
    vocabulary, so training stops rewarding ever more confident answers (Szegedy et al., 2016): a
    remedy for a classifier whose one-word answers become overconfident on a small data set.
    Supervised positions only, as the default loss."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0 <= smoothing < 1:
            raise UsageError(f"--loss_args: label_smoothing's smoothing must lie in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets, _ = supervised_logits(outputs.logits, batch["labels"])
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


class ContrastiveLoss(nn.Module):
    """Contrastive loss on sentence pairs (Hadsell, Chopra and LeCun, 2006): a similar pair (label 1)
    is pulled together, a dissimilar one (label 0) pushed until `margin` apart, and a dissimilar pair
    already that far apart costs nothing, so the embedding space is not torn up to separate what is
    separate. Each text's embedding is the mean of the last hidden states over its real tokens, which
    serves an encoder (all-MiniLM) and a causal LM alike. `distance`: cosine (1 - cosine similarity,
    blind to the hidden states' scale, so one margin suits any model) or euclidean.

    The margin must exceed the distance of unrelated texts (about 0.8 for all-MiniLM): below it, the
    cheapest way down is to pull every text together, and on SST-2 pairs a margin of 0.5 did just that
    (all distances fell to ~0.22, the loss to the collapse value 1/32) while 1.0 separated the tones."""

    model_kwargs = {"output_hidden_states": True}  # a causal LM returns only logits otherwise

    def __init__(self, margin: float = 1.0, distance: Literal["cosine", "euclidean"] = "cosine"):
        super().__init__()
        if margin <= 0:
            raise UsageError(f"--loss_args: contrastive's margin must be positive, got {margin}")
        if distance not in ("cosine", "euclidean"):
            raise UsageError(f"--loss_args: contrastive's distance is cosine or euclidean, got {distance!r}")
        self.margin = margin
        self.distance = distance

    def forward(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        first, second = pair_embeddings(outputs, batch)
        if self.distance == "cosine":
            d = 1 - F.cosine_similarity(first, second)
        else:
            d = F.pairwise_distance(first, second)
        similar = batch["labels"].float()
        return 0.5 * (similar * d.pow(2) + (1 - similar) * F.relu(self.margin - d).pow(2)).mean()


def pair_embeddings(outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two texts' mean-pooled embeddings for each pair of a `PairCollator` batch (float32)."""
    hidden = getattr(outputs, "last_hidden_state", None)  # an encoder; a causal LM has hidden_states
    if hidden is None:
        hidden = outputs.hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    n = batch["labels"].shape[0]
    return pooled[:n], pooled[n:]


# None: the default, token cross-entropy on the Trainer's own path (`causal_lm_loss`).
BUILTINS: dict[str, type[nn.Module] | None] = {
    "cross_entropy": None,
    "label_smoothing": LabelSmoothing,
    "contrastive": ContrastiveLoss,
}


def build_loss(spec: str, args: dict[str, Any]) -> tuple[nn.Module | None, dict[str, Any]]:
    """The loss module for `--loss` (None for the default) and the manifest's record of it.

    Runs before any data or model is loaded, so a wrong path, class or argument fails in a second.
    """
    record: dict[str, Any] = {"type": spec}
    if spec in BUILTINS:
        cls, origin = BUILTINS[spec], None
        if cls is None:
            if args:
                raise UsageError(f"--loss_args: {spec} takes no arguments, got {', '.join(args)}")
            return None, {**record, "args": {}}
    else:
        cls, origin = _user_class(spec)
        record.update(file=str(origin), sha256=hashlib.sha256(origin.read_bytes()).hexdigest())
    # nn.Module's own __init__ takes (*args, **kwargs) only to refuse them: a class without one takes nothing
    signature = inspect.signature(cls) if cls.__init__ is not nn.Module.__init__ else inspect.Signature()
    try:
        bound = signature.bind(**args)
    except TypeError as err:
        raise UsageError(f"--loss_args for {cls.__name__}: {err}; it takes ({_parameters(signature)})") from None
    bound.apply_defaults()
    record["args"] = {k: v for k, v in bound.arguments.items() if isinstance(v, (str, int, float, bool, list, dict))}
    try:
        return cls(**args), record
    except Exception as err:
        if origin is None:
            raise
        raise user_error(err, origin, f"{cls.__name__}.__init__") from err


def use_loss(trainer: Any, loss: nn.Module) -> None:
    """Make `trainer` compute every loss (training, evaluation, the pre-flight step) as `loss(outputs, batch)`.

    The loss is a batch mean, so the Trainer divides it by the gradient accumulation steps
    (`loss_is_scaled_for_ga = False`), and data-parallel ranks average it like any mean.
    """
    loss.to(trainer.args.device)
    extra = dict(getattr(loss, "model_kwargs", {}))
    origin = _origin(loss)
    name = type(loss).__name__

    def compute_loss(model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, **extra)
        if origin is None:
            value = loss(outputs, inputs)
        else:
            try:
                value = loss(outputs, inputs)
            except Exception as err:
                raise user_error(err, origin, f"{name}.forward") from err
            _check_value(value, origin, name, model.training)
        return (value, outputs) if return_outputs else value

    trainer.compute_loss = compute_loss
    trainer.loss_is_scaled_for_ga = False


def reads_kept_logits(loss: nn.Module | None) -> bool:
    """Whether the loss takes logits at the supervised positions only (`logits_to_keep`, the fast path).
    A user's loss gets them at every position, aligned with `batch["labels"]`: one shape to write for."""
    return loss is None or isinstance(loss, LabelSmoothing)


def user_error(err: BaseException, origin: Path, where: str) -> UsageError:
    """One line for an exception raised in the user's file: its deepest line there, the error, the code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == origin]
    text = str(err).strip().splitlines()
    problem = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    if not frames:
        return UsageError(f"{origin}: {problem} (in {where})")
    frame = frames[-1]
    code = f": `{frame.line.strip()}`" if frame.line else ""
    return UsageError(f"{origin}:{frame.lineno}: {problem} (in {where}{code})")


def _user_class(spec: str) -> tuple[type[nn.Module], Path]:
    """Import FILE.py under a private module name and return its class; nothing else is imported."""
    file, _, name = spec.rpartition(":")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"--loss {spec}: no such file {file}; give FILE.py:ClassName with the path to your "
                         f"Python file")
    module_name = f"{USER_MODULE}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and typing look a class's module up here
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise UsageError(f"{err.filename}:{err.lineno}: SyntaxError: {err.msg} (loading --loss {spec})") from None
    except Exception as err:
        raise user_error(err, path, f"loading --loss {spec}") from err
    cls = getattr(module, name, None)
    if cls is None:
        found = [k for k, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module_name]
        raise UsageError(f"--loss {spec}: {path.name} defines no {name!r}; torch.nn.Module classes there: "
                         f"{', '.join(found) or 'none'}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"--loss {spec}: {name} is not a torch.nn.Module subclass; derive it from "
                         f"torch.nn.Module and define forward(self, outputs, batch)")
    return cls, path


def _origin(loss: nn.Module) -> Path | None:
    """The user's file a loss class came from; None for slmops's own."""
    cls = type(loss)
    return Path(inspect.getfile(cls)) if cls.__module__.startswith(USER_MODULE) else None


def _check_value(value: Any, origin: Path, name: str, training: bool) -> None:
    """The Trainer would fail later and deep inside itself on anything but a scalar tensor with a gradient."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise UsageError(f"{origin}: {name}.forward returned {got}; return the batch's mean loss as a scalar tensor")
    if training and not value.requires_grad:
        raise UsageError(f"{origin}: {name}.forward returned a tensor without a gradient; compute it from "
                         f"`outputs` with torch operations (no .item(), .detach() or numpy)")


def _parameters(signature: inspect.Signature) -> str:
    return ", ".join(str(p) for p in signature.parameters.values()) or "no arguments"
