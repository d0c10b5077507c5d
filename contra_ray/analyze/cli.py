"""Analyses of the distillation, as CLI subcommands; the computations live in :mod:`contra_ray.analyze.correlation`.

``python -m contra_ray.analyze correlation --preset cifar10_ipc1_cpu --mode both --epochs 0:8 --Z 20``

``correlation`` (paper §4.2, Eq. 7, Fig. 2 and 3): hold out the reference expert τ_o, and for each matched
epoch i distill from the same initial set (``--warmup W``: the set after W ordinary iterations) for Z
iterations matching only epoch i (sequential: K = 0, β = 1; concurrent: the config's K segments and β, the
sampled one fixed to i); after every iteration
measure the Eq. 2 loss of each epoch j of τ_o and correlate the series. Writes, per mode, into
``<run dir>/correlation`` (or ``--out``): ``correlation_<mode>.csv`` (r_ij), ``correlation_<mode>.png``
(heatmap) and ``correlation_<mode>.json`` (summary, settings and the raw losses); prints the summary
table and logs everything to one MLflow run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from contra_ray.analyze.correlation import (
    correlation_losses,
    mode_config,
    pearson_matrix,
    save_correlation_csv,
    save_correlation_heatmap,
    triangle_summary,
)
from contra_ray.augment import dsa_if
from contra_ray.common.argtypes import non_negative_int
from contra_ray.common.cli import add_common_args, check_folder, cli_entry, cli_error, config_from_args, interrupted
from contra_ray.common.fileio import atomic_write
from contra_ray.common.seeds import derive_seed
from contra_ray.config import Config, ConfigError, check_device
from contra_ray.data.prepare import prepare_data
from contra_ray.distill.cli import experts_interrupted_message
from contra_ray.distill.distiller import Distiller, init_pool
from contra_ray.distill.monitor import ForgettingMonitor
from contra_ray.experts.remote import ensure_experts
from contra_ray.experts.store import reference_expert_id
from contra_ray.tracking import RunLogger, check_destinations, init_tracking


def parse_epoch_range(text: str) -> tuple[int, int]:
    """``"i0:i1"`` -> ``(i0, i1)``, epochs i0..i1-1 (Python slice semantics).

    Raises:
        ConfigError: not of the form ``i0:i1`` with 0 <= i0 and i1 >= i0 + 2 (a heatmap of one epoch has
            no off-diagonal correlation to report).
    """
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--epochs={text!r}: expected i0:i1 (epochs i0..i1-1), e.g. 0:8") from None
    if not 0 <= a < b:
        raise ConfigError(f"--epochs={text!r}: need 0 <= i0 < i1")
    if b - a < 2:
        raise ConfigError(f"--epochs={text!r}: one epoch has no pair to correlate; give at least two "
                          f"(e.g. {a}:{a + 2})")
    return a, b


def run_correlation(cfg: Config, data, store, modes: list[str], epochs: list[int], Z: int,
                    reference_id: int, out_dir: Path, logger=None, progress: bool = True,
                    warmup: int = 0) -> dict[str, dict]:
    """Run the correlation experiment for each mode; write CSV, PNG and JSON per mode into ``out_dir``.

    Args:
        cfg: validated config (the sequential / concurrent variants are derived from it).
        data: :class:`contra_ray.distill.PreparedData`; store: the expert store.
        epochs: matched epochs (heatmap rows), also the monitored epochs of τ_o (columns).
        reference_id: τ_o, never given to a distiller.
        logger: :class:`contra_ray.tracking.RunLogger` or None.
        warmup: iterations of ordinary distillation (the mode's config, sampled starts, τ_o held out)
            before the fixed-epoch phase; every row starts from that state. 0: from the initial set.
    Returns:
        ``{mode: summary dict}`` (what ``correlation_<mode>.json`` holds, without the raw losses).
    Raises:
        ConfigError: an epoch whose segment does not fit in the store, or an invalid mode config.
    """
    import torch


    configs = {mode: mode_config(cfg, mode) for mode in modes}  # validate every mode before any work
    M = cfg.distill.expert_epochs
    monitor = ForgettingMonitor(store, reference_id, epochs, M, seed=derive_seed(cfg.distill.seed, "monitor"))
    others = [i for i in store.expert_ids if i != reference_id]
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict[str, dict] = {}
    for mode, mcfg in configs.items():
        d = mcfg.distill

        def make_distiller(i: int | None, mcfg=mcfg, state: dict | None = None) -> Distiller:
            dist = Distiller(mcfg, store, data.spec, *init_pool(mcfg, data),
                             augment=dsa_if(mcfg.distill.dsa), expert_ids=others, device=cfg.device,
                             fixed_start=i)
            if state is not None:
                dist.load_state_dict(copy.deepcopy(state))  # a copy: optimizers may share loaded buffers
            return dist

        start_state = None
        if warmup:
            warm = make_distiller(None)
            for _ in range(warmup):
                warm.step()
            start_state = warm.state_dict()
            if progress:
                print(f"[{mode}] {warmup} warm-up iterations done", flush=True)

        t0 = time.time()

        def report(i: int, z: int, row: list[float], mode=mode, t0=t0) -> None:
            if progress and z == Z:
                print(f"[{mode}] matched epoch {i}: losses on τ_o after {Z} iterations "
                      + " ".join(f"{v:.3f}" for v in row) + f"  ({time.time() - t0:.0f} s)", flush=True)

        losses = correlation_losses(lambda i, s=start_state: make_distiller(i, state=s), monitor, epochs, Z, report)
        r = pearson_matrix(losses)
        tri = triangle_summary(r, epochs, epochs)
        summary = {"mode": mode, "ipc": d.ipc, "Z": Z, "N": d.syn_steps, "M": M, "K": d.K, "beta": d.beta,
                   "warmup": warmup,
                   "concurrent_starts": d.concurrent_starts() if d.K else [], "epochs": epochs,
                   "reference_expert": reference_id, "distill_experts": others, "seconds": time.time() - t0,
                   **tri}
        stem = out_dir / f"correlation_{mode}"
        save_correlation_csv(r, epochs, epochs, f"{stem}.csv")
        save_correlation_heatmap(r, epochs, epochs, f"{stem}.png",
                                 f"Eq. 7 PCC, {mode} matching, τ_o = expert {reference_id}\n"
                                 f"IPC={d.ipc}, Z={Z}, N={d.syn_steps}, M={M}"
                                 + (f", K={d.K}, β={d.beta}" if mode == "concurrent" else "")
                                 + (f", warm-up {warmup}" if warmup else ""))
        payload = {**summary, "r": [[None if v != v else v for v in row] for row in r.tolist()],
                   "losses": losses.tolist(), "losses_shape": "[matched epoch i, iteration z, epoch j of τ_o]"}
        atomic_write(f"{stem}.json", json.dumps(payload, indent=1))
        results[mode] = summary
        if logger is not None:
            for ext in ("csv", "png", "json"):
                logger.log_artifact(f"{stem}.{ext}", "correlation")
            logger.log_metrics({f"{mode}_{part}_{k}": summary[part][k] for part in ("lower", "upper")
                                for k in ("mean_r", "frac_negative")})
    return results


def format_summary(results: dict[str, dict]) -> str:
    """The per-heatmap summary as a text table."""
    head = f"{'mode':<11} {'IPC':>3} {'Z':>3} {'N':>3} {'mean r lower':>12} {'neg lower':>9} " \
           f"{'mean r upper':>12} {'neg upper':>9} {'NaN':>4}"
    lines = [head, "-" * len(head)]
    for mode, s in results.items():
        lo, up = s["lower"], s["upper"]
        lines.append(f"{mode:<11} {s['ipc']:>3} {s['Z']:>3} {s['N']:>3} {lo['mean_r']:>12.3f} "
                     f"{lo['frac_negative']:>9.2f} {up['mean_r']:>12.3f} {up['frac_negative']:>9.2f} "
                     f"{lo['nan'] + up['nan'] + s['diagonal']['nan']:>4}")
    return "\n".join(lines)


def _at_least_3(s: str) -> int:
    """``--Z``: Pearson's r over fewer than 3 iterations is undefined (1) or always +-1 (2)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {s!r}") from None
    if v < 3:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3 (Pearson's r over Z iterations), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m contra_ray.analyze", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("correlation", help="segment-correlation heatmaps (paper §4.2, Eq. 7, Fig. 2/3)",
                       description="Hold out τ_o, match one fixed epoch i at a time, correlate the Eq. 2 "
                                   "losses of every epoch of τ_o over Z iterations (Eq. 7).")
    add_common_args(c)
    c.add_argument("--mode", choices=("sequential", "concurrent", "both"), default="both",
                   help="sequential: match only epoch i (K=0, β=1); concurrent: Eq. 8 with the sampled segment "
                        "fixed to i (default: %(default)s)")
    c.add_argument("--epochs", default=None, metavar="I0:I1",
                   help="matched and monitored epochs i0..i1-1 (default: every start whose segment of "
                        "distill.expert_epochs fits in the store)")
    c.add_argument("--Z", type=_at_least_3, default=20,
                   help="distillation iterations per matched epoch (default: %(default)s)")
    c.add_argument("--warmup", type=non_negative_int, default=0,
                   help="ordinary distillation iterations before the fixed-epoch phase, shared by all rows of a "
                        "mode (0: start from the initial real images; default: %(default)s)")
    c.add_argument("--reference-expert", type=non_negative_int, default=None,
                   help="expert id held out as τ_o (default: distill.reference_expert, else the highest id)")
    c.add_argument("--experts", help="expert store directory (default: <run dir>/experts)")
    c.add_argument("--no-train-experts", action="store_true", help="fail instead of training missing experts")
    c.add_argument("--out", help="output directory (default: <run dir>/correlation)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 2 invalid input, before any work (a destination that cannot be written included);
    1 a failure of the machine during the work (one ``error: <path>: <cause>`` line); 130 Ctrl-C (one line
    saying what a rerun does)."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        cfg = getattr(args, "_cfg", None)
        experts = experts_interrupted_message(cfg, then="computes the correlations") if cfg is not None else None
        return interrupted(experts or "interrupted: rerunning the same command computes every mode's correlation "
                                      "again (trained experts and decoded data are kept)")


def _main(args: argparse.Namespace) -> int:

    try:
        if args.warmup < 0:
            raise ConfigError(f"--warmup={args.warmup}: must be >= 0")
        cfg = args._cfg = config_from_args(args, verbatim={"experts.store": args.experts})
        check_device(cfg.device)  # the probes distill in this process
        check_destinations(cfg.output_dir, cfg.tracking_uri() if cfg.tracking.enabled else None,
                           cache_dir=cfg.data.cache_dir)
        if args.out:
            check_folder(args.out, "--out")
        span = parse_epoch_range(args.epochs) if args.epochs else None
        modes = ["sequential", "concurrent"] if args.mode == "both" else [args.mode]
        if "concurrent" in modes:

            mode_config(cfg, "concurrent")  # fail on β = 0 before loading anything
        data = prepare_data(cfg)
        store = ensure_experts(cfg, data, train_missing=not args.no_train_experts)
        ref = reference_expert_id(store, args.reference_expert if args.reference_expert is not None
                                  else cfg.distill.reference_expert)
        last = store.epochs - cfg.distill.expert_epochs
        i0, i1 = span or (0, last + 1)
        if i1 - 1 > last:
            raise ConfigError(f"--epochs={i0}:{i1}: epoch {i1 - 1} + M={cfg.distill.expert_epochs} exceeds the "
                              f"store's {store.epochs} saved epochs (largest usable: {i0}:{last + 1})")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return cli_error(e)
    epochs = list(range(i0, i1))
    out = Path(args.out) if args.out else cfg.run_dir() / "correlation"
    print(f"correlation: modes {modes}, epochs {i0}..{i1 - 1}, Z={args.Z}, τ_o = expert {ref}, "
          f"distilling from experts {[i for i in store.expert_ids if i != ref]}", flush=True)
    if cfg.tracking.enabled:
        init_tracking(cfg.tracking_uri(), cfg.tracking.experiment)
    with RunLogger(cfg, f"{cfg.name}-correlation", enabled=cfg.tracking.enabled) as logger:
        logger.log_params({"analysis.modes": modes, "analysis.epochs": f"{i0}:{i1}", "analysis.Z": args.Z,
                           "analysis.reference_expert": ref, "analysis.warmup": args.warmup})
        try:
            results = run_correlation(cfg, data, store, modes, epochs, args.Z, ref, out, logger,
                                      warmup=args.warmup)
        except ConfigError as e:
            return cli_error(e)
    print(f"\nEq. 7 correlation summary (lower: j < i, upper: j > i; neg = fraction of r_ij < 0)\n"
          f"{format_summary(results)}")
    for mode in results:
        print(f"{mode}: {out / f'correlation_{mode}.png'}  {out / f'correlation_{mode}.csv'}  "
              f"{out / f'correlation_{mode}.json'}")
    return 0
