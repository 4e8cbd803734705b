"""Post-hoc calibration of classifier logits: temperature, vector and isotonic scaling."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

from pipeline.errors import ConfigError, DataError, did_you_mean
from pipeline.records import CalibrationChoice
from pipeline.stats import apply_calibration, check_groups, check_labels, softmax

# T is searched in [1/20, 20]. Trained networks are rarely more than a few times over- or under-confident;
# an unbounded fit on a validation split without signal runs to T → ∞ and makes every probability equal.
MAX_TEMPERATURE = 20.0
_MAX_LOG_T = np.log(MAX_TEMPERATURE)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """Validate logits shaped (N, C) with N ≥ 1, C ≥ 2 and finite values; return float64.

    Raises:
        DataError: naming the argument, the actual shape/values and what is expected.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise DataError(
            f"{name}: expected an array shaped (N, C) with N ≥ 1 and C ≥ 2 (binary = 2 logits), "
            f"got shape {z.shape}. Pass the model's raw outputs, one row per image."
        )
    if not np.all(np.isfinite(z)):
        raise DataError(
            f"{name}: {int((~np.isfinite(z)).sum())} non-finite values (NaN/inf); "
            "check the model outputs before calibrating."
        )
    return z


def _check_xy(logits: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    z = check_logits(logits)
    return z, check_labels(y, z.shape[0], z.shape[1])


class Calibrator:
    """Common interface: `fit(logits, y) -> self`, `transform(logits) -> probs (N, C)`.

    `n_classes_` is set by `fit`; transform checks it so an unfitted or mismatched use fails loudly.
    """

    n_classes_: int | None = None

    def fit(self, logits: Any, y: Any) -> Calibrator:
        """Fit on validation logits (N, C) and labels (N,); returns self."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The fitted calibration as JSON-safe parameters (`pipeline.stats.apply_calibration` applies them).

        They are stored with the packaged model, so scoring applies exactly the calibration that
        evaluation measured.
        """
        raise NotImplementedError

    def transform(self, logits: Any) -> np.ndarray:
        """Return calibrated probabilities (N, C): `apply_calibration(self.params(), logits)`."""
        self._check_fitted(logits)
        return apply_calibration(self.params(), logits)

    def _check_fitted(self, logits: Any) -> np.ndarray:
        if self.n_classes_ is None:
            raise ConfigError(
                f"{type(self).__name__} is not fitted: call fit(logits_val, y_val) before transform(logits)."
            )
        z = check_logits(logits)
        if z.shape[1] != self.n_classes_:
            raise DataError(f"logits: fitted on {self.n_classes_} classes, got {z.shape[1]} columns.")
        return z

    def fit_transform(self, logits: Any, y: Any) -> np.ndarray:
        """Fit on (logits, y) and return the calibrated probabilities of the same logits."""
        return self.fit(logits, y).transform(logits)


class TemperatureScaler(Calibrator):
    """Temperature scaling (Guo et al. 2017): probs = softmax(logits / T), one scalar T > 0.

    T is fitted by minimising the validation NLL with L-BFGS over log T (so T stays positive).
    Dividing by T never changes the arg-max, so accuracy is unchanged.
    """

    def __init__(self) -> None:
        self.temperature_: float = 1.0
        self.nll_before_: float | None = None
        self.nll_after_: float | None = None

    @staticmethod
    def _nll_and_grad(log_t: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        t = float(np.exp(log_t[0]))
        logp = _log_softmax(z / t)
        nll = -float(logp[np.arange(len(y)), y].mean())
        p = np.exp(logp)
        # d nll / d log T = mean((z_y - E_p[z]) / T)
        grad = float(((z[np.arange(len(y)), y] - (p * z).sum(axis=1)) / t).mean())
        return nll, np.array([grad])

    def fit(self, logits: Any, y: Any) -> TemperatureScaler:
        """Fit T on validation logits (N, C) and labels (N,); returns self."""
        z, labels = _check_xy(logits, y)
        res = minimize(
            self._nll_and_grad,
            x0=np.zeros(1),
            args=(z, labels),
            jac=True,
            method="L-BFGS-B",
            bounds=[(-_MAX_LOG_T, _MAX_LOG_T)],
        )
        self.temperature_ = float(np.exp(res.x[0]))
        self.nll_before_ = self._nll_and_grad(np.zeros(1), z, labels)[0]
        self.nll_after_ = float(res.fun)
        self.n_classes_ = z.shape[1]
        return self

    def params(self) -> dict[str, Any]:
        """{"method": "temperature", "temperature": T}: probabilities softmax(logits / T)."""
        return {"method": "temperature", "temperature": float(self.temperature_)}


class VectorScaler(Calibrator):
    """Vector scaling (Guo et al. 2017): probs = softmax(logits * w + b), per-class w and b.

    Fitted by minimising validation NLL with L-BFGS plus a tiny L2 pull towards (w=1, b=0)
    that keeps the fit finite on separable data. Unlike temperature scaling it can change
    the arg-max, so accuracy may change.
    """

    def __init__(self, l2: float = 1e-4) -> None:
        self.l2 = l2
        self.scale_: np.ndarray | None = None
        self.bias_: np.ndarray | None = None

    def _loss(self, theta: np.ndarray, z: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
        c = z.shape[1]
        w, b = theta[:c], theta[c:]
        logp = _log_softmax(z * w + b)
        resid = np.exp(logp) - onehot  # d nll / d logits, per sample
        n = len(z)
        penalty = self.l2 * (np.sum((w - 1.0) ** 2) + np.sum(b**2))
        loss = -float((logp * onehot).sum()) / n + penalty
        grad_w = (resid * z).sum(axis=0) / n + 2 * self.l2 * (w - 1.0)
        grad_b = resid.sum(axis=0) / n + 2 * self.l2 * b
        return loss, np.concatenate([grad_w, grad_b])

    def fit(self, logits: Any, y: Any) -> VectorScaler:
        """Fit per-class scale and bias on validation logits (N, C) and labels (N,); returns self."""
        z, labels = _check_xy(logits, y)
        c = z.shape[1]
        onehot = np.eye(c)[labels]
        x0 = np.concatenate([np.ones(c), np.zeros(c)])
        res = minimize(self._loss, x0=x0, args=(z, onehot), jac=True, method="L-BFGS-B")
        self.scale_, self.bias_ = res.x[:c].copy(), res.x[c:].copy()
        self.n_classes_ = c
        return self

    def params(self) -> dict[str, Any]:
        """{"method": "vector", "scale": [w_c], "bias": [b_c]}: probabilities softmax(logits * w + b)."""
        if self.scale_ is None or self.bias_ is None:
            raise ConfigError("VectorScaler is not fitted: call fit(logits_val, y_val) first.")
        return {"method": "vector", "scale": self.scale_.tolist(), "bias": self.bias_.tolist()}


class IsotonicCalibrator(Calibrator):
    """Isotonic regression on the softmax probabilities (scikit-learn `IsotonicRegression`).

    Binary: one monotone map of P(class 1); P(class 0) = 1 − that. Multi-class: one-vs-rest maps
    per class, then rows renormalised to sum to 1 (a row that maps to all zeros becomes uniform).
    Isotonic maps are step functions: they may create ties and change accuracy/AUROC slightly.
    """

    def __init__(self) -> None:
        self.regressors_: list[IsotonicRegression] = []

    def fit(self, logits: Any, y: Any) -> IsotonicCalibrator:
        """Fit on validation logits (N, C) and labels (N,); returns self."""
        z, labels = _check_xy(logits, y)
        p = softmax(z)
        cols = [1] if z.shape[1] == 2 else range(z.shape[1])
        self.regressors_ = [
            IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
                p[:, c], (labels == c).astype(np.float64)
            )
            for c in cols
        ]
        self.n_classes_ = z.shape[1]
        return self

    def params(self) -> dict[str, Any]:
        """{"method": "isotonic", "x": [...], "y": [...]}: each fitted map's breakpoints (one list per map).

        A map is the piecewise-linear interpolation of its breakpoints, clipped at both ends: what
        scikit-learn's `IsotonicRegression.predict` computes with ``out_of_bounds="clip"``.
        """
        return {
            "method": "isotonic",
            "x": [r.X_thresholds_.tolist() for r in self.regressors_],
            "y": [r.y_thresholds_.tolist() for r in self.regressors_],
        }


class _Identity(Calibrator):
    """No calibration: plain softmax (the `calibration: none` choice)."""

    def fit(self, logits: Any, y: Any) -> _Identity:
        z, _ = _check_xy(logits, y)
        self.n_classes_ = z.shape[1]
        return self

    def params(self) -> dict[str, Any]:
        """{"method": "none"}: plain softmax."""
        return {"method": "none"}


CALIBRATORS: dict[str, type[Calibrator]] = {
    "temperature": TemperatureScaler,
    "vector": VectorScaler,
    "isotonic": IsotonicCalibrator,
    "none": _Identity,
}


def make_calibrator(name: str) -> Calibrator:
    """Return an unfitted calibrator for `name`: temperature | vector | isotonic | none.

    Raises:
        ConfigError: for an unknown name, with the valid choices and a "did you mean".
    """
    if name not in CALIBRATORS:
        choices = list(CALIBRATORS)
        raise ConfigError(
            f"evaluate.calibration: unknown method '{name}'{did_you_mean(name, choices)}; "
            f"expected one of {', '.join(choices)}."
        )
    return CALIBRATORS[name]()


# --------------------------------------------------------------------------- choosing a calibration
# A calibration fitted on too few validation images overfits them and makes test calibration worse.
# The rule of thumb of clinical prediction modelling (Riley et al. 2019: at least 10–20 events per
# fitted parameter) is applied to the rarest validation class: 20 images per parameter for the
# parametric maps, and 100 for isotonic regression, which is non-parametric and known to overfit
# small calibration sets (Niculescu-Mizil & Caruana 2005).
PER_PARAMETER = 20
CHOICES = (*CALIBRATORS, "auto")  # what evaluate.calibration accepts
AUTO_CANDIDATES = ("temperature", "vector")  # isotonic is never chosen automatically
CV_FOLDS = 5


def minimum_smallest_class(method: str, n_classes: int) -> int:
    """Images of the rarest validation class a method needs: 20 per fitted parameter, 100 for isotonic."""
    params = {"none": 0, "temperature": 1, "vector": 2 * n_classes}
    return 100 if method == "isotonic" else PER_PARAMETER * params[method]


def _patient_codes(groups: Any, n: int) -> np.ndarray:
    """Patient numbers 0..I−1 per row (`stats.check_groups`); None: every row is its own patient."""
    return np.arange(n) if groups is None else check_groups(groups, n, "groups_val")


def patient_folds(y: np.ndarray, codes: np.ndarray, k: int = CV_FOLDS, seed: int = 0) -> np.ndarray:
    """A fold number in 0..k−1 per row: all of a patient's rows share a fold, stratified by the patient's label.

    `codes` numbers the patients 0..I−1 (one per row). Patients are labelled by their highest
    class, shuffled within each label (seeded) and dealt to the folds in turn, so each fold holds
    about 1/k of every label's patients.
    """
    n_patients = int(codes.max()) + 1
    label = np.zeros(n_patients, dtype=np.int64)
    np.maximum.at(label, codes, y)
    rng = np.random.default_rng(seed)
    fold = np.empty(n_patients, dtype=np.int64)
    start = 0
    for c in np.unique(label):
        members = rng.permutation(np.flatnonzero(label == c))
        fold[members] = (start + np.arange(len(members))) % k
        start += len(members)  # the next label starts where this one stopped, so fold sizes stay even
    return fold[codes]


def _out_of_fold_loss(method: str, z: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Per-image log loss of `method` on validation, each fold calibrated by a fit on the other folds."""
    logp = np.empty(len(y))
    for f in np.unique(folds):
        held = folds == f
        probs = make_calibrator(method).fit(z[~held], y[~held]).transform(z[held])
        logp[held] = np.log(np.clip(probs[np.arange(int(held.sum())), y[held]], 1e-15, 1.0))
    return -logp


def _clustered_se(diff: np.ndarray, codes: np.ndarray) -> float:
    """Standard error of the mean of per-image values, patients as clusters (their images are correlated)."""
    sums = np.bincount(codes, weights=diff)
    counts = np.bincount(codes)
    mean = diff.mean()
    n_patients = len(sums)
    if n_patients < 2:
        return float("inf")
    resid = sums - counts * mean
    return float(np.sqrt(n_patients / (n_patients - 1) * np.sum(resid**2)) / len(diff))


def choose_calibration(
    requested: str, logits: Any, y: Any, groups: Any = None, seed: int = 0
) -> tuple[Calibrator, CalibrationChoice]:
    """Fit the calibration `requested` (a method, or "auto") on validation; say which was fitted and why.

    An explicit method is always fitted; when the rarest validation class has fewer images than
    the method needs (`minimum_smallest_class`) the choice is marked `undersized`. "auto" fits
    nothing (method "none") below the temperature's minimum; otherwise it cross-validates on
    validation (5 folds of patients, stratified by label) each candidate the data is large enough
    for — temperature and vector scaling — against plain softmax, and fits the one with the lowest
    out-of-fold NLL on all of validation. Softmax is kept when no candidate lowers it: a
    calibration that does not help on held-out validation patients is not applied to test.

    Args:
        requested: evaluate.calibration. logits: validation logits (N, C). y: labels (N,).
        groups: one patient pseudonym per validation row (None: every image is its own patient).

    Returns:
        (the fitted calibrator, the `records.CalibrationChoice`).
    """
    z, labels = _check_xy(logits, y)
    c = z.shape[1]
    smallest = int(np.bincount(labels, minlength=c).min())
    n = len(labels)
    if requested not in CHOICES:
        raise ConfigError(
            f"evaluate.calibration: unknown method '{requested}'{did_you_mean(requested, CHOICES)}; "
            f"expected one of {', '.join(CHOICES)}."
        )
    if requested != "auto":
        need = minimum_smallest_class(requested, c)
        undersized = smallest < need
        reason = f"{requested} requested in evaluate.calibration"
        if undersized:
            reason += (
                f"; validation has {smallest} image(s) in its smallest class, {requested} needs ≥ {need} "
                "to fit reliably, so it may overfit (calibration: auto would fit none)"
            )
        choice = CalibrationChoice(requested, requested, reason, n, smallest, need, undersized=undersized)
        return make_calibrator(requested).fit(z, labels), choice
    need = minimum_smallest_class("temperature", c)
    if smallest < need:
        reason = (
            f"validation too small to fit a calibration: {smallest} image(s) in its smallest class, "
            f"temperature scaling needs ≥ {need}; probabilities are the plain softmax"
        )
        return make_calibrator("none").fit(z, labels), CalibrationChoice("auto", "none", reason, n, smallest, need)
    codes = _patient_codes(groups, n)
    folds = patient_folds(labels, codes, seed=seed)
    eligible = [m for m in AUTO_CANDIDATES if smallest >= minimum_smallest_class(m, c)]
    losses = {m: _out_of_fold_loss(m, z, labels, folds) for m in ("none", *eligible)}
    cv = {m: float(v.mean()) for m, v in losses.items()}
    best = "none"
    for m in eligible:  # simplest first; a more complex map must beat the current choice by > 1 SE
        gain = losses[best] - losses[m]
        if gain.mean() > _clustered_se(gain, codes):
            best = m
    k = len(np.unique(folds))
    if best == "none":
        tried = " or ".join(f"{m} scaling ({cv[m]:.4f})" for m in eligible)
        reason = (
            f"cross-validated on validation ({k} patient folds), neither {tried} lowered the NLL of the plain "
            f"softmax ({cv['none']:.4f}) by more than one standard error; probabilities are the plain softmax"
            if len(eligible) > 1
            else f"cross-validated on validation ({k} patient folds), {tried} did not lower the NLL of the plain "
            f"softmax ({cv['none']:.4f}) by more than one standard error; probabilities are the plain softmax"
        )
    else:
        reason = (
            f"{best} scaling lowered the out-of-fold validation NLL from {cv['none']:.4f} to {cv[best]:.4f} "
            f"({k} patient folds; candidates {', '.join(['none', *eligible])}, each kept only when it beats the "
            "simpler one by more than one standard error)"
        )
    choice = CalibrationChoice("auto", best, reason, n, smallest, need, cv_nll=cv)
    return make_calibrator(best).fit(z, labels), choice
