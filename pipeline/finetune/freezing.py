"""Freezing by named layer groups (never by numeric index), BatchNorm policy, per-layer learning rates."""

from __future__ import annotations

from torch import nn

from pipeline.errors import ConfigError, did_you_mean

Groups = list[tuple[str, list[str]]]  # ordered stem → head: (group name, parameter-name prefixes)


def group_of(name: str, groups: Groups) -> int:
    """Index of the group a parameter belongs to (longest matching prefix)."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(groups):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best < 0:
        raise ConfigError(f"parameter '{name}' belongs to no layer group; the backbone's layer_groups is incomplete")
    return best


STRATEGIES = ("linear-probe", "finetune", "partial", "gradual", "lp-ft")


def trainable_group_indices(strategy: str, n_groups: int, *, phase: int = 0, partial_freeze: int = 2) -> set[int]:
    """Which groups train: linear-probe → head; finetune → all; partial → all but the first N;
    gradual → the head plus one more group (from the top) per phase; lp-ft → the head in its probe
    phase (0), all groups after (`pipeline.finetune.lp_ft` runs the two phases)."""
    if strategy == "lp-ft":
        strategy = "linear-probe" if phase == 0 else "finetune"
    if strategy == "linear-probe":
        return {n_groups - 1}
    if strategy == "finetune":
        return set(range(n_groups))
    if strategy == "partial":
        return set(range(min(partial_freeze, n_groups - 1), n_groups))
    if strategy == "gradual":
        return set(range(max(0, n_groups - 1 - phase), n_groups))
    raise ConfigError(
        f"finetune.strategy: unknown '{strategy}'{did_you_mean(strategy, STRATEGIES)}; choose one of {list(STRATEGIES)}"
    )


def apply_freezing(model: nn.Module, groups: Groups, trainable: set[int]) -> int:
    """Set requires_grad by group; returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name, groups) in trainable)
        n += p.numel() if p.requires_grad else 0
    return n


def set_bn_policy(model: nn.Module, bn: str) -> None:
    """After model.train(): with bn='frozen', BatchNorm layers whose weights are frozen go to eval
    mode, so their running statistics do not change."""
    if bn != "frozen":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def param_groups(
    model: nn.Module,
    groups: Groups,
    trainable: set[int],
    lr: float,
    decay: float,
    head_lr: float | None = None,
    weight_decay: float = 1e-4,
) -> list[dict]:
    """One optimizer group per trainable layer group; lr decays by `decay` per group from the head."""
    by_group: dict[int, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        g = group_of(name, groups)
        if g in trainable:
            by_group.setdefault(g, []).append(p)
    top = len(groups) - 1
    out = []
    for g in sorted(by_group):
        group_lr = (head_lr or lr) if g == top else lr * decay ** (top - g)
        out.append(
            {
                "params": by_group[g],
                "lr": group_lr,
                "initial_lr": group_lr,
                "name": groups[g][0],
                "weight_decay": weight_decay,
            }
        )
    return out
