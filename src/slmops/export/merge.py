"""The merge pass: a base model with its adapter merged in, saved as a plain Hugging Face folder."""

from __future__ import annotations

import logging
from pathlib import Path

from slmops.artifacts.folders import publish, refuse_existing, work_dir
from slmops.artifacts.manifest import write_manifest
from slmops.errors import UsageError
from slmops.export.source import find_source, load_reference, trained_for
from slmops.options.export_options import MergeOptions

log = logging.getLogger(__name__)


def merge(opts: MergeOptions) -> Path:
    out = Path(opts.output_path).expanduser()
    if opts.adapter_path is None:
        raise UsageError("merging needs an adapter: give the adapter folder (adapter_path)")
    refuse_existing(out, opts.overwrite)
    source = find_source(opts.model_name_or_path, opts.adapter_path)
    if trained_for(source):
        log.warning("the adapter was trained for a %s export; merged into float weights it loses that (export it "
                    "with ModelBuilder at that precision instead)", trained_for(source))
    model, tokenizer = load_reference(source, opts.trust_remote_code)  # merged in fp32
    work = work_dir(out)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    write_manifest(work / "manifest.json", "merge", opts.model_dump(), {}, {}, {})
    publish(work, out)
    return out
