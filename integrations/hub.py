"""Publish hf-compress artifacts to the Hub with their model card, in one atomic commit.

``push_to_hub(source, repo_id)`` takes a saved folder or an in-memory model. It renders the card first (so a
broken checkpoint fails before anything is sent), uploads the checkpoint's files (never Trainer state) plus
README.md and the plot in a single ``create_commit`` (the Hub applies a commit whole or not at all), and never
writes into the local folder.

transformers' own ``model.push_to_hub`` replaces README.md with a generic card after saving, and it offers no hook
to change that; so models hf-compress produces get ``push_to_hub`` / ``save_pretrained`` that go through here:
our registered architectures by the :class:`HubCardMixin` base class, quantized models (plain transformers
classes) and PEFT models hf-compress makes by :func:`enable_hub_cards` on the instance, which the quantizer and
``relax`` call when they make the model.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
import types
import warnings
from pathlib import Path

from hf_compress.integrations.card_inputs import CARD_INPUTS_FILE, record_card_inputs, upload_files
from hf_compress.checkpoint.artifacts import inspect_checkpoint
from hf_compress.checkpoint.atomic import atomic_directory
from hf_compress.checkpoint.verify import verify_safetensors_file
from hf_compress.integrations.model_card import render_card

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def push_to_hub(source, repo_id: str, *, token: str | None = None, private: bool | None = None, exist_ok: bool = False,
                commit_message: str | None = None, commit_description: str | None = None, base_model: str | None = None,
                results: list[dict] | None = None, tags: list[str] | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: str | int | None = None) -> str:
    """Upload ``source`` (a checkpoint folder, or a model/PEFT model to save first) to ``repo_id``; returns the
    commit (or pull request) URL.

    Raises ValueError for a bad repo id, a missing or rejected token, an existing repo without ``exist_ok``, a
    adapter whose base is not on the Hub, or an upload the Hub refuses; ConnectionError when the network
    fails (nothing is committed then). The local files are never modified.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass token=...")
    request = dict(repo_id=repo_id, api=HfApi(token=token), private=private, exist_ok=exist_ok, tags=tags,
                   commit_message=commit_message, commit_description=commit_description, revision=revision,
                   create_pr=create_pr)
    if isinstance(source, (str, os.PathLike)):
        return _push_folder(Path(source), None, base_model, results, **request)
    adapters = getattr(source, "peft_config", None)
    if isinstance(adapters, dict) and len(adapters) > 1:
        raise ValueError(f"the PEFT model holds {len(adapters)} adapters ({', '.join(adapters)}): push one at a time "
                         "(save each with save_pretrained(selected_adapters=[name]) and push its folder)")
    inputs = getattr(source, "hfc_card_inputs", None) or {}
    with tempfile.TemporaryDirectory(prefix="hfc-push-") as tmp:
        _plain_save(source, tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return _push_folder(Path(tmp), source, base_model or inputs.get("base_model"),
                            results if results is not None else inputs.get("results"), **request)


def _class_save_pretrained(model):
    """transformers'/PEFT's ``save_pretrained`` for ``model``'s class, skipping our mixin and any instance hook."""
    for cls in type(model).__mro__:
        if "save_pretrained" in vars(cls) and cls is not HubCardMixin:
            return vars(cls)["save_pretrained"]
    raise TypeError(f"cannot push a {type(model).__name__}: it has no save_pretrained (pass a checkpoint folder)")


def _plain_save(model, folder, **kwargs) -> None:
    """Save without a card, so the caller renders it once."""
    _class_save_pretrained(model)(model, folder, **kwargs)


def _push_folder(folder, model, base_model, results, *, repo_id, api, private, exist_ok, tags, commit_message,
                 commit_description, revision, create_pr):
    from huggingface_hub import CommitOperationAdd

    artifact = inspect_checkpoint(folder)
    replaced = {}
    if artifact.adapter_config:  # an adapter only loads from the Hub if its base is on the Hub
        base_model, replaced = _adapter_base(artifact, base_model)
    card = render_card(folder, repo_id=repo_id, base_model=base_model, results=results, model=model, tags=tags)
    skipped = {"README.md", *card.images, *replaced}
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in upload_files(folder)
                  if p.relative_to(folder).as_posix() not in skipped]
    operations += [CommitOperationAdd(name, data) for name, data in replaced.items()]
    operations.append(CommitOperationAdd("README.md", str(card.card).encode("utf-8")))
    operations += [CommitOperationAdd(name, data) for name, data in card.images.items()]
    created = False
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=exist_ok)
            created = not exist_ok
        except Exception as exc:
            if _status(exc) == 409:
                raise ValueError(f"repository {repo_id} already exists on the Hub; pass exist_ok=True "
                                 "(hf-compress push --update) to add a commit to it") from None
            raise
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            info = api.create_commit(repo_id, operations, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {artifact.kind} model made with hf-compress",
                                     commit_description=commit_description)
        except ValueError as exc:  # huggingface_hub's own refusals, e.g. card metadata the Hub did not validate
            raise ValueError(f"the Hub refused the upload to {repo_id}: {exc}") from exc
    except ValueError:
        raise
    except Exception as exc:
        raise _push_failed(folder, repo_id, exc, created) from exc
    return info.pr_url or info.commit_url


def _adapter_base(artifact, base_model):
    """An adapter is only loadable from the Hub if its ``base_model_name_or_path`` is a Hub id: returns the
    base and, when it differs from the file's, a corrected ``adapter_config.json`` to upload (the local file stays)."""
    recorded = artifact.adapter_config.get("base_model_name_or_path")
    base = base_model or recorded
    if not base or not HUB_ID.fullmatch(base) or os.path.exists(base):
        raise ValueError(f"this adapter's base model is {base!r}, not a Hub repo id, so the pushed adapter could "
                         "not load; push the base model first and pass base_model='user/base-repo' "
                         "(hf-compress push --base-model)")
    if base == recorded:
        return base, {}
    config = {**artifact.adapter_config, "base_model_name_or_path": base}
    return base, {"adapter_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _push_failed(folder, repo_id, exc, created: bool) -> Exception:
    """Transport failures become ConnectionError (retrying may help); refusals by the Hub become ValueError."""
    status = _status(exc)
    server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    if status in (401, 403):
        return ValueError(f"the Hub rejected the token for {repo_id} (HTTP {status}): check that it is valid and has "
                          "write access")
    if status == 404:
        return ValueError(f"the Hub has no repository or branch for {repo_id} ({server})")
    if status is not None and 400 <= status < 500:
        return ValueError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {server}")
    retry = ("the (empty) repository was created, so retry with exist_ok=True (hf-compress push --update)"
             if created else "retry")
    return ConnectionError(f"pushing {folder} to {repo_id} failed ({type(exc).__name__}: {server}). Nothing was "
                           f"committed (a Hub commit is all or nothing) and the local checkpoint is unchanged; {retry}.")


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, base_model: str | None = None,
                    results: list[dict] | None = None, overwrite: bool = False, **kwargs) -> Path:
    """``model.save_pretrained`` made atomic (safetensors only), plus ``tokenizer`` and, for a model hf-compress
    made, its model card (``base_model`` and measured ``results`` are recorded for it).

    Files in ``save_directory`` that are not part of the checkpoint are kept. A folder holding anything but an
    hf-compress checkpoint is refused unless ``overwrite=True`` (ValueError, before anything is written)."""
    kwargs.pop("safe_serialization", None)
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        _plain_save(model, tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in Path(tmp).glob("*.safetensors"):
            verify_safetensors_file(f)
        if is_hfc_model(model):
            write_card(model, tmp, repo_id=Path(save_directory).name, base_model=base_model, results=results)
    return Path(save_directory)


def write_card(model, folder, repo_id: str | None = None, base_model: str | None = None,
               results: list[dict] | None = None) -> Path:
    """Write README.md and the plot into a saved ``folder`` (recording ``base_model``/``results`` for later cards)."""
    inputs = dict(getattr(model, "hfc_card_inputs", None) or {})
    if base_model or results or (inputs and not (Path(folder) / CARD_INPUTS_FILE).exists()):
        record_card_inputs(folder, base_model=base_model or inputs.get("base_model"),
                           results=results or inputs.get("results"))
    return render_card(folder, repo_id=repo_id, model=model).save(folder)


def _save_then_card(model, class_save, save_directory, args, kwargs):
    """``class_save`` with transformers' arguments, then the card on the main process only; with
    ``push_to_hub=True`` the folder is pushed through :func:`push_to_hub` so the card goes up too."""
    bound = inspect.signature(class_save).bind(model, save_directory, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop("self", None)
    extra = call.pop("kwargs", {})
    push = call.pop("push_to_hub", False)
    hub = {k: extra.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr") if k in extra}
    if call.get("token") or extra.get("token"):
        hub["token"] = call.get("token") or extra.get("token")
    if not call.get("is_main_process", True):  # other ranks write shards of the main process's folder
        class_save(model, **call, **extra)
        return
    # Atomic like `hf_compress.save_pretrained`: a failure (a full disk) leaves the previous checkpoint loadable.
    # transformers' semantics are kept: unrelated files stay, an existing checkpoint is replaced.
    with atomic_directory(save_directory, overwrite=True) as tmp:
        class_save(model, **{**call, "save_directory": tmp}, **extra)
        try:
            write_card(model, tmp, repo_id=Path(save_directory).name)
        except (ValueError, OSError) as exc:  # e.g. selected adapters saved in subfolders: no top-level artifact
            warnings.warn(f"hf-compress wrote no model card into {save_directory}: {exc}", stacklevel=3)
            push = False
    if push:
        push_to_hub(save_directory, hub.pop("repo_id", Path(save_directory).name), exist_ok=True, **hub)


class HubCardMixin:
    """For hf-compress's registered architectures: ``save_pretrained`` also writes the card, and ``push_to_hub``
    uploads through :func:`push_to_hub` (with transformers' default of adding a commit to an existing repo)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        _save_then_card(self, _class_save_pretrained(self), save_directory, args, kwargs)

    def push_to_hub(self, repo_id: str, *, exist_ok: bool = True, **kwargs) -> str:
        return push_to_hub(self, repo_id, exist_ok=exist_ok, **kwargs)


def enable_hub_cards(model, tags: list[str] | None = None) -> None:
    """Give one model instance (a quantized plain-transformers model, or a PEFT model) card-writing
    ``save_pretrained`` and card-uploading ``push_to_hub``; idempotent."""
    if getattr(model, "_hfc_hub_cards", False):
        return
    if tags and hasattr(model, "add_model_tags"):
        model.add_model_tags(["hf-compress", *tags])
    def save_pretrained(self, save_directory, *args, **kwargs):
        _save_then_card(self, _class_save_pretrained(self), save_directory, args, kwargs)

    def push(self, repo_id: str, *, exist_ok: bool = True, **kwargs) -> str:
        return push_to_hub(self, repo_id, exist_ok=exist_ok, **kwargs)

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push, model)
    model._hfc_hub_cards = True


def is_hfc_model(model) -> bool:
    """Whether ``model`` is an artifact hf-compress made (and so gets our card)."""
    if getattr(model, "_hfc_hub_cards", False) or isinstance(model, HubCardMixin):
        return True
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    return str(getattr(quant, "quant_method", "")).startswith("hfc_")
