"""Experiment tracking. Local files stay the source of truth; W&B mirrors them.

W&B never prompts and never blocks: ``mode=auto`` (the default, unless ``WANDB_MODE`` is set) runs
online only when credentials exist (``WANDB_API_KEY`` or a netrc entry for the W&B host) and
offline otherwise, with the offline run written under the run directory (``wandb/offline-run-*``,
upload later with ``wandb sync``). Every W&B call is guarded: a failing W&B warns and the run
continues with its local files.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from lmc.errors import ConfigError

__all__ = ["NullTracker", "WandbTracker", "resolve_wandb_mode", "tracker"]

WANDB_MODES = ("auto", "online", "offline", "disabled")


class NullTracker:
    """Logs nothing (``logger=none``)."""

    name = "none"

    def log_curves(self, rows: list[Mapping]) -> None: ...

    def log_summary(self, values: Mapping[str, float]) -> None: ...

    def log_images(self, paths: list[Path]) -> None: ...

    def finish(self, failed: bool) -> None: ...


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str | None) -> str:
    """``auto`` (or empty) → ``online`` with credentials, else ``offline``; other modes unchanged."""
    mode = (mode or "auto").lower()
    if mode not in WANDB_MODES:
        raise ConfigError(f"unknown logger.mode '{mode}'; valid: {', '.join(WANDB_MODES)}")
    if mode == "auto":
        return "online" if _has_wandb_credentials() else "offline"
    return mode


class WandbTracker:
    """One W&B run per lmc run. Curves are logged with α as the step metric and as a table."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: Mapping, project: str, entity: str | None, mode: str,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None):
        import wandb

        self._wandb = wandb
        self.mode = resolve_wandb_mode(mode)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags or []),
            dir=str(run_dir),
            config=dict(config),
            mode=self.mode,
            reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True, init_timeout=30, x_disable_stats=True,
                                    disable_git=True, save_code=False),
        )

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - W&B must never take the run down
            warnings.warn(f"W&B {what} failed ({type(exc).__name__}: {exc}); local files are unaffected",
                          stacklevel=3)

    def log_curves(self, rows: list[Mapping]) -> None:
        def log():
            self.run.define_metric("alpha")
            self.run.define_metric("interp/*", step_metric="alpha")
            by_alpha: dict[float, dict[str, float]] = {}
            for r in rows:
                if any(r.get(k) not in ("", None) for k in ("layer", "set", "base", "epoch")):
                    continue  # the final models' whole-model curves only (a curve is keyed by all of these)
                d = by_alpha.setdefault(float(r["alpha"]), {})
                d[f"interp/{r['method']}/{r['split']}/loss"] = r["loss"]
                d[f"interp/{r['method']}/{r['split']}/error"] = 1 - r["acc"]
            for alpha in sorted(by_alpha):
                self.run.log({"alpha": alpha, **by_alpha[alpha]})
            cols = ["method", "layer", "split", "alpha", "loss", "acc"]
            extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in cols]  # set, base, epoch, ...
            data = [[r[c] for c in cols] + [str(r.get(c, "")) for c in extra] for r in rows]  # as in curves.csv
            self.run.log({"curves": self._wandb.Table(columns=cols + extra, data=data)})

        self._guard("curve logging", log)

    def log_summary(self, values: Mapping[str, float]) -> None:
        self._guard("summary", lambda: self.run.summary.update(dict(values)))

    def log_images(self, paths: list[Path]) -> None:
        self._guard("image logging",
                    lambda: self.run.log({f"plots/{p.stem}": self._wandb.Image(str(p)) for p in paths}))

    def finish(self, failed: bool) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=1 if failed else 0))


@contextlib.contextmanager
def tracker(logger_cfg: Mapping, run_dir: Path, config: Mapping, name: str | None = None
            ) -> Iterator[NullTracker | WandbTracker]:
    """The tracker selected by ``logger_cfg['name']``; finished on exit, also when the run fails."""
    kind = logger_cfg.get("name", "none")
    if kind == "none":
        t: NullTracker | WandbTracker = NullTracker()
    elif kind == "wandb":
        mode = resolve_wandb_mode(logger_cfg.get("mode"))
        try:
            t = WandbTracker(run_dir, config, project=logger_cfg.get("project", "lmc"),
                             entity=logger_cfg.get("entity"), mode=mode, name=name,
                             group=logger_cfg.get("group"), tags=logger_cfg.get("tags"))
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B could not start ({type(exc).__name__}: {exc}); continuing with local files only",
                          stacklevel=2)
            t = NullTracker()
    else:
        raise ConfigError(f"unknown logger '{kind}'; valid: wandb, none")
    failed = True
    try:
        yield t
        failed = False
    finally:
        t.finish(failed)


def flatten(prefix: str, nested: Mapping) -> dict[str, float]:
    """``{"a": {"b": 1}}`` → ``{"prefix/a/b": 1}``."""
    out = {}
    for k, v in nested.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(key, v))
        else:
            out[key] = v
    return out
