"""Publish hf-compress artifacts to the Hub with their model card, in one atomic commit.

``push_to_hub(source, repo_id)`` takes a saved folder or an in-memory model. It renders the card first (so a
broken checkpoint fails before anything is sent), uploads the folder's files plus README.md and the plot in a
single ``create_commit`` (the Hub applies a commit whole or not at all), and never writes into the local folder.

transformers' own ``model.push_to_hub`` replaces README.md with a generic card after saving, and it offers no hook
to change that; so models hf-compress produces get ``push_to_hub`` / ``save_pretrained`` that go through here:
our registered architectures by the :class:`HubCardMixin` base class, quantized models (plain transformers
classes) by :func:`enable_hub_cards` on the instance, which the quantizer calls when it attaches itself.
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

from .artifacts import CARD_INPUTS_FILE, inspect_checkpoint, record_card_inputs
from .model_card import render_card

SKIPPED = ("README.md",)  # replaced by the rendered card


def push_to_hub(source, repo_id: str, *, token: str | None = None, private: bool | None = None, exist_ok: bool = False,
                commit_message: str | None = None, base_model: str | None = None, results: list[dict] | None = None,
                revision: str | None = None, create_pr: bool = False) -> str:
    """Upload ``source`` (a checkpoint folder, or a model/PEFT model to save first) to ``repo_id``; returns the commit URL.

    Raises ValueError for a bad repo id, a missing or rejected token, or an existing repo without ``exist_ok``;
    ConnectionError when the network fails (nothing is committed then, and the local files are untouched).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass token=...")
    if isinstance(source, (str, os.PathLike)):
        return _push_folder(Path(source), None, repo_id, HfApi(token=token), private, exist_ok, commit_message,
                            base_model, results, revision, create_pr)
    with tempfile.TemporaryDirectory(prefix="hfc-push-") as tmp:
        _plain_save(source, tmp)
        return _push_folder(Path(tmp), source, repo_id, HfApi(token=token), private, exist_ok, commit_message,
                            base_model, results, revision, create_pr)


def _plain_save(model, folder, **kwargs) -> None:
    """The class's own ``save_pretrained`` (not an instance hook), so the card is rendered once, by the caller."""
    save = getattr(type(model), "save_pretrained", None)
    if save is None:
        raise TypeError(f"cannot push a {type(model).__name__}: it has no save_pretrained (pass a checkpoint folder)")
    for cls in type(model).__mro__:  # skip our own mixin: it would write a card too
        if "save_pretrained" in vars(cls) and cls is not HubCardMixin:
            vars(cls)["save_pretrained"](model, folder, **kwargs)
            return


def _push_folder(folder, model, repo_id, api, private, exist_ok, commit_message, base_model, results, revision, create_pr):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    artifact = inspect_checkpoint(folder)
    card = render_card(folder, repo_id=repo_id, base_model=base_model, results=results, model=model)
    replaced = {*SKIPPED, *card.images}
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in replaced
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
    operations.append(CommitOperationAdd("README.md", str(card.card).encode("utf-8")))
    operations += [CommitOperationAdd(name, data) for name, data in card.images.items()]
    created = False
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=exist_ok)
            created = not exist_ok
        except HfHubHTTPError as exc:
            if _status(exc) == 409:
                raise ValueError(f"repository {repo_id} already exists on the Hub; pass exist_ok=True "
                                 "(hf-compress push --update) to add a commit to it") from None
            raise
        info = api.create_commit(repo_id, operations, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {artifact.kind} model made with hf-compress")
    except HfHubHTTPError as exc:
        if _status(exc) in (401, 403):
            raise ValueError(f"the Hub rejected the token for {repo_id} (HTTP {_status(exc)}): check that it is valid "
                             "and has write access") from None
        raise _push_failed(folder, repo_id, exc, created) from exc
    except Exception as exc:
        import httpx2

        if isinstance(exc, (OSError, httpx2.HTTPError)):  # transport errors, after huggingface_hub's retries
            raise _push_failed(folder, repo_id, exc, created) from exc
        raise
    return info.pr_url or info.commit_url


def _push_failed(folder, repo_id, exc, created: bool) -> ConnectionError:
    retry = ("the (empty) repository was created, so retry with exist_ok=True (hf-compress push --update)"
             if created else "retry")
    return ConnectionError(f"pushing {folder} to {repo_id} failed ({type(exc).__name__}: {exc}). Nothing was committed "
                           f"(a Hub commit is all or nothing) and the local checkpoint is unchanged; {retry}.")


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def write_card(model, folder, repo_id: str | None = None, base_model: str | None = None,
               results: list[dict] | None = None) -> Path:
    """Write README.md and the plot into a saved ``folder`` (recording ``base_model``/``results`` for later cards)."""
    inputs = dict(getattr(model, "hfc_card_inputs", None) or {})
    if base_model or results or (inputs and not (Path(folder) / CARD_INPUTS_FILE).exists()):
        record_card_inputs(folder, base_model=base_model or inputs.get("base_model"),
                           results=results or inputs.get("results"))
    return render_card(folder, repo_id=repo_id, model=model).save(folder)


class HubCardMixin:
    """For hf-compress's registered architectures: ``save_pretrained`` also writes the card, and ``push_to_hub``
    uploads through :func:`push_to_hub` (with transformers' default of adding a commit to an existing repo)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload transformers' generic card; "
                             "call model.push_to_hub(repo_id) instead")
        super().save_pretrained(save_directory, *args, **kwargs)
        write_card(self, save_directory)

    def push_to_hub(self, repo_id: str, *, exist_ok: bool = True, **kwargs) -> str:
        return push_to_hub(self, repo_id, exist_ok=exist_ok, **_hub_kwargs(kwargs))


def _hub_kwargs(kwargs: dict) -> dict:
    """Accept transformers' push_to_hub keywords; refuse those that would change what is uploaded."""
    kwargs.pop("tags", None)  # our card carries its own tags
    for ignored in ("max_shard_size", "safe_serialization"):
        kwargs.pop(ignored, None)
    kwargs.pop("commit_description", None)
    known = {"token", "private", "commit_message", "base_model", "results", "revision", "create_pr", "exist_ok"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"push_to_hub got unexpected keyword arguments {unknown}")
    return kwargs


def enable_hub_cards(model, tags: list[str] | None = None) -> None:
    """Give one model instance (a quantized plain-transformers model, or a PEFT model) card-writing
    ``save_pretrained`` and card-uploading ``push_to_hub``; idempotent."""
    if getattr(model, "_hfc_hub_cards", False):
        return
    if tags and hasattr(model, "add_model_tags"):
        model.add_model_tags(["hf-compress", *tags])
    class_save = type(model).save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) would upload transformers' generic card; "
                             "call model.push_to_hub(repo_id) instead")
        class_save(self, save_directory, *args, **kwargs)
        write_card(self, save_directory)

    def push(self, repo_id: str, *, exist_ok: bool = True, **kwargs) -> str:
        return push_to_hub(self, repo_id, exist_ok=exist_ok, **_hub_kwargs(kwargs))

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push, model)
    model._hfc_hub_cards = True


def is_hfc_model(model) -> bool:
    """Whether ``model`` is an artifact hf-compress made (and so gets our card)."""
    if getattr(model, "_hfc_hub_cards", False) or isinstance(model, HubCardMixin):
        return True
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    return str(getattr(quant, "quant_method", "")).startswith("hfc_")
