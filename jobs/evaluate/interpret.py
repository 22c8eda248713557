"""Gengram interpretability (arXiv 2601.22203, section 5.5 and appendix B): where the memory writes into
the residual stream, whether its table learned reverse-complement symmetry and the genetic code, and how
early the layers become prediction-ready. Pure functions of a model (or one Gengram module) and token
batches, and the plots of what they return; the job logs both.

    write intensity   s_l(t) = ||Gengram_l(h_l, x)(t)||_2, beside the gate alpha_l(t)
    RC symmetry       d(x, rc x) = 1 - cos(e_x, e_rc(x)), against composition-matched random pairs
    codon clusters    k-means of the 64 codon rows against the standard genetic code
    LogitLens-KL      KL(p_L || p_l),  p_l = softmax(lm_head(final_norm(h_l)))

Every model runs in eval mode, without autograd and with dropless MoE routing (see ARCHITECTURE.md,
"The model's routing"): what is measured at a position must not depend on the rest of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator
from scipy.stats import mannwhitneyu
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from jobs.common.plots import save_figure
from model.gengram import Gengram
from model.transformer import GengramLM
from model.vocab import COMPLEMENT, PAD, A, C, G, T, encode

PAPER_WINDOW = 21  # W of the paper's models: the default spacing of distinct write peaks

# The standard genetic code (NCBI translation table 1), by amino acid; "*" is stop.
SYNONYMOUS_CODONS: dict[str, str] = {
    "A": "GCT GCC GCA GCG",  # alanine
    "R": "CGT CGC CGA CGG AGA AGG",  # arginine
    "N": "AAT AAC",  # asparagine
    "D": "GAT GAC",  # aspartate
    "C": "TGT TGC",  # cysteine
    "Q": "CAA CAG",  # glutamine
    "E": "GAA GAG",  # glutamate
    "G": "GGT GGC GGA GGG",  # glycine
    "H": "CAT CAC",  # histidine
    "I": "ATT ATC ATA",  # isoleucine
    "L": "TTA TTG CTT CTC CTA CTG",  # leucine
    "K": "AAA AAG",  # lysine
    "M": "ATG",  # methionine
    "F": "TTT TTC",  # phenylalanine
    "P": "CCT CCC CCA CCG",  # proline
    "S": "TCT TCC TCA TCG AGT AGC",  # serine
    "T": "ACT ACC ACA ACG",  # threonine
    "W": "TGG",  # tryptophan
    "Y": "TAT TAC",  # tyrosine
    "V": "GTT GTC GTA GTG",  # valine
    "*": "TAA TAG TGA",  # stop
}
GENETIC_CODE: dict[str, str] = {
    codon: amino_acid for amino_acid, codons in SYNONYMOUS_CODONS.items() for codon in codons.split()
}


@contextlib.contextmanager
def _inspecting(model: GengramLM) -> Iterator[None]:
    """Eval mode, no autograd, dropless routing; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.dropless_routing():
            yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- residual write intensity


@dataclass(frozen=True)
class WriteTrace:
    """One Gengram layer over a batch, numpy [B, S] each."""

    intensity: np.ndarray  # s_l(t) = ||Gengram_l(h, x)(t)||_2: how hard the memory pushed the stream at t
    gate: np.ndarray  # alpha_l(t) in (0, 1): how far the gate let it through


def write_intensity(model: GengramLM, ids: torch.Tensor) -> dict[int, WriteTrace]:
    """Per Gengram layer id, what it wrote into the residual stream at every position of `ids` [B, S]
    (PAD included: the caller leaves out what it does not look at)."""
    with _inspecting(model):
        out = model(ids.to(model.lm_head.weight.device), compute_loss=False, keep_hidden=True)
    return {
        layer_id: WriteTrace(
            intensity=torch.linalg.vector_norm(write.float(), dim=-1).cpu().numpy(),
            gate=out.gengram_gates[layer_id].float().cpu().numpy(),
        )
        for layer_id, write in out.gengram_writes.items()
    }


def span_mask(spans: Iterable[tuple[int, int]], length: int) -> np.ndarray:
    """bool [length]: the positions inside any half-open span [start, end), spans clipped to the sequence."""
    mask = np.zeros(length, dtype=bool)
    for start, end in spans:
        mask[max(start, 0) : max(end, 0)] = True
    return mask


def top_peaks(intensity: np.ndarray, count: int, spacing: int = PAPER_WINDOW) -> np.ndarray:
    """Positions of the `count` highest distinct peaks of a trace [S], highest first: greedily the highest
    position at least `spacing` from every peak already taken (fewer if the sequence runs out).

    A k-mer stays in every window that holds it, so one motif lifts a run of up to W positions; with
    spacing W (the Gengram window) such a run counts as one peak, not as `count` neighbours.
    """
    taken: list[int] = []
    for position in np.argsort(-np.asarray(intensity), kind="stable"):
        if len(taken) == count:
            break
        if all(abs(position - peak) >= spacing for peak in taken):
            taken.append(int(position))
    return np.array(taken, dtype=np.int64)


def feature_enrichment(intensity: np.ndarray, inside: np.ndarray, top: int = 10,
                       spacing: int = PAPER_WINDOW) -> dict[str, float]:
    """Whether one sequence's write intensity [S] lands on its features (`inside`, bool [S]).

    mean_inside / mean_outside: mean s(t) over the positions inside any feature / outside all of them (NaN
    when there are none), ratio their quotient (> 1: enriched); top_peak_share: the share of the `top`
    highest distinct peaks (`top_peaks` with `spacing`) that fall inside a feature. The write at t reads the
    window that ends at t, so a motif's own peak may trail its end by up to W - k positions: widen `inside`
    to the right by the window when the features are motifs rather than regions.
    """
    intensity, inside = np.asarray(intensity, dtype=np.float64), np.asarray(inside, dtype=bool)
    if intensity.ndim != 1 or intensity.shape != inside.shape:
        raise ValueError(f"one sequence at a time: intensity {intensity.shape} and inside {inside.shape} "
                         "must both be [S]")
    mean_inside, mean_outside = _mean(intensity[inside]), _mean(intensity[~inside])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean_inside / mean_outside
    return {
        "mean_inside": float(mean_inside),
        "mean_outside": float(mean_outside),
        "ratio": float(ratio),
        "top_peak_share": float(inside[top_peaks(intensity, top, spacing)].mean()),
    }


def _mean(values: np.ndarray) -> np.float64:
    return values.mean() if values.size else np.float64(np.nan)


def plot_write_intensity(traces: dict[int, WriteTrace], tracks: dict[str, list[tuple[int, int]]], path: Path,
                         sequence: int = 0, title: str = "Gengram residual writes") -> Path:
    """Heatmaps along sequence `sequence` of the batch: s_l(t) and alpha_l(t), one row per Gengram layer;
    beneath them one annotation track per entry of `tracks` (e.g. GFF features, planted motifs)."""
    layers = sorted(traces)
    intensity = np.stack([traces[layer].intensity[sequence] for layer in layers])
    gate = np.stack([traces[layer].gate[sequence] for layer in layers])
    # Each layer is scaled to its own maximum: the layers write at different scales, and the question is
    # where each one's peaks are, not how high they are against another layer's.
    intensity = intensity / np.maximum(intensity.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    length = intensity.shape[1]
    heights = [len(layers), len(layers), max(len(tracks), 1)]
    fig, axes = plt.subplots(3, 2, figsize=(12, 1.5 + 0.4 * sum(heights)), sharex="col",
                             gridspec_kw={"height_ratios": heights, "width_ratios": [60, 1]})
    extent = (-0.5, length - 0.5, len(layers) - 0.5, -0.5)
    panels = ((intensity, "magma", r"$s_l(t)\,/\,\max_t\,s_l$"), (gate, "viridis", r"gate $\alpha_l(t)$"))
    for row, (values, cmap, label) in enumerate(panels):
        image = axes[row, 0].imshow(values, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
                                    extent=extent)
        axes[row, 0].set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        fig.colorbar(image, cax=axes[row, 1], label=label)
    track_axes = axes[2, 0]
    for row, spans in enumerate(tracks.values()):
        track_axes.broken_barh([(start, end - start) for start, end in spans], (row - 0.4, 0.8), color=f"C{row}")
    track_axes.set_yticks(range(len(tracks)), list(tracks))
    track_axes.set_ylim(max(len(tracks), 1) - 0.5, -0.5)
    track_axes.set_xlim(-0.5, length - 0.5)
    track_axes.set_xlabel("position (bp)")
    axes[2, 1].axis("off")
    axes[0, 0].set_title(title)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- the memory table

BASES = np.array([A, C, G, T])  # consecutive token ids 1..4, so id - A is the base-4 digit


def acgt_kmers(k: int) -> np.ndarray:
    """Every k-mer over ACGT as token ids [4**k, k], in lexicographic order: row i spells i in base 4."""
    place = 4 ** np.arange(k - 1, -1, -1)
    return BASES[np.arange(4**k)[:, None] // place % 4]


def _lexicographic_index(kmers: np.ndarray) -> np.ndarray:
    """The row of each k-mer [n, k] in `acgt_kmers(k)`."""
    return (kmers.astype(np.int64) - A) @ 4 ** np.arange(kmers.shape[1] - 1, -1, -1)


def kmer_embeddings(gengram: Gengram, kmers: np.ndarray) -> np.ndarray:
    """Memory rows [n, D] (float64) of k-mers [n, k] given as token ids, located by the module's own lookup."""
    k = kmers.shape[1]
    if k not in gengram.config.ngram_sizes:
        raise ValueError(f"this Gengram holds no {k}-mers: its ngram_sizes are {gengram.config.ngram_sizes}")
    rows, _ = gengram.kmer_rows(torch.tensor(kmers, device=gengram.memory.weight.device))
    row = rows[:, k - 1, gengram.config.ngram_sizes.index(k)]  # the k-mer that ends at its last base
    return gengram.memory.weight.detach()[row].double().cpu().numpy()


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


@dataclass(frozen=True)
class RCRow:
    """Reverse-complement symmetry of the k-mer block of one Gengram layer's table."""

    layer_id: int
    k: int
    pairs: int  # RC pairs {x, rc(x)}, each once, palindromes (x = rc(x)) excluded
    null_pairs: int  # composition-matched random pairs: one drawn for each non-palindromic k-mer that has a match
    rc_distance: float  # median cosine distance 1 - cos(e_x, e_rc(x)) over the RC pairs
    null_distance: float  # the same median over the null pairs
    u_statistic: float  # Mann-Whitney U of the RC distances against the null's
    p_value: float  # one-sided: RC pairs closer than the null
    rank_biserial: float  # 1 - 2U / (pairs * null_pairs): +1 every RC pair closer than every null pair, 0 none


def rc_symmetry(gengram: Gengram, layer_id: int, seed: int = 0) -> list[RCRow]:
    """Whether each k-mer's memory row lies closer to its reverse complement's than chance, per k >= 2 of
    the module's ngram_sizes, over ACGT k-mers (k = 1 has no null: a base's only composition match is its
    complement). The null pairs depend on (seed, k) only, so every layer is tested against the same pairs.
    """
    results = []
    for k in gengram.config.ngram_sizes:
        if k == 1:
            continue
        kmers = acgt_kmers(k)
        rc = _lexicographic_index(COMPLEMENT[kmers[:, ::-1]])
        unit = _unit_rows(kmer_embeddings(gengram, kmers))
        first = np.arange(len(kmers)) < rc  # x < rc(x): each pair once, and palindromes never
        rc_distance = 1 - np.sum(unit[first] * unit[rc[first]], axis=1)
        partner = _composition_matched_partners(kmers, rc, np.random.default_rng([seed, k]))
        drawn = np.flatnonzero(partner >= 0)
        null_distance = 1 - np.sum(unit[drawn] * unit[partner[drawn]], axis=1)
        test = mannwhitneyu(rc_distance, null_distance, alternative="less")
        n, m = len(rc_distance), len(null_distance)
        results.append(
            RCRow(layer_id=layer_id, k=k, pairs=n, null_pairs=m,
                  rc_distance=float(np.median(rc_distance)), null_distance=float(np.median(null_distance)),
                  u_statistic=float(test.statistic), p_value=float(test.pvalue),
                  rank_biserial=float(1 - 2 * test.statistic / (n * m)))
        )
    return results


def _composition_matched_partners(kmers: np.ndarray, rc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each non-palindromic k-mer x, a random y (an index) with y != x, y != rc(x) and the base
    composition of rc(x); -1 for palindromes and where no such y exists.

    y is rc(x) with its bases rearranged, so whatever the table encodes of composition alone (GC content
    above all, which x and rc(x) share) makes y as close to x as rc(x) is: only the order of the bases,
    i.e. reverse-complement symmetry itself, can set the RC pairs apart.
    """
    _, composition = np.unique(np.stack([(kmers == base).sum(1) for base in BASES], 1), axis=0,
                               return_inverse=True)
    partner = np.full(len(kmers), -1)
    for x in np.flatnonzero(rc != np.arange(len(kmers))):
        candidates = np.flatnonzero(composition == composition[rc[x]])
        candidates = candidates[(candidates != x) & (candidates != rc[x])]
        if len(candidates):
            partner[x] = rng.choice(candidates)
    return partner


def _codon_rows(gengram: Gengram) -> tuple[list[str], np.ndarray]:
    """The 64 codons in GENETIC_CODE's order, and their 3-mer rows scaled to unit length: cosine is the
    geometry of every comparison here, so k-means and PCA see the directions, not the row norms."""
    codons = list(GENETIC_CODE)
    kmers = encode("".join(codons)).reshape(len(codons), 3)
    return codons, _unit_rows(kmer_embeddings(gengram, kmers))


def codon_clusters(gengram: Gengram, seed: int = 0) -> dict[str, float]:
    """k-means of the 64 codon rows into 21 clusters (20 amino acids + stop), scored against the standard
    genetic code: ari (adjusted Rand index: 1 the code itself, about 0 chance) and nmi (normalised mutual
    information, not chance-corrected: with 21 clusters of 64 codons a random table already scores about 0.6)."""
    codons, unit = _codon_rows(gengram)
    amino_acids = [GENETIC_CODE[codon] for codon in codons]
    clusters = KMeans(n_clusters=len(SYNONYMOUS_CODONS), n_init=10, random_state=seed).fit_predict(unit)
    return {
        "ari": float(adjusted_rand_score(amino_acids, clusters)),
        "nmi": float(normalized_mutual_info_score(amino_acids, clusters)),
    }


def plot_codon_projection(gengram: Gengram, path: Path, title: str = "Codon rows of the 3-mer memory") -> Path:
    """The 64 codon rows projected on their first two principal components, coloured by amino acid."""
    codons, unit = _codon_rows(gengram)
    pca = PCA(n_components=2)
    points = pca.fit_transform(unit)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    colours = [*plt.get_cmap("tab20").colors, "black"]  # 20 amino acids, then stop
    for colour, amino_acid in zip(colours, SYNONYMOUS_CODONS, strict=True):
        members = [i for i, codon in enumerate(codons) if GENETIC_CODE[codon] == amino_acid]
        ax.scatter(points[members, 0], points[members, 1], color=colour, s=30, label=amino_acid)
        for i in members:
            ax.annotate(codons[i], points[i], xytext=(3, 2), textcoords="offset points", fontsize=7)
    share = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
    ax.set_title(title)
    ax.legend(title="amino acid", fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- LogitLens-KL


def logit_lens_kl(model: GengramLM, ids: torch.Tensor) -> np.ndarray:
    """[L + 1]: KL(p_L || p_l) in nats for l = 0 (the embedding) .. L, averaged over the non-PAD positions of
    `ids` [B, S]. p_l reads layer l's residual stream through the model's own final norm and LM head, so
    p_L is the model's prediction and index L is exactly 0."""
    with _inspecting(model):
        ids = ids.to(model.lm_head.weight.device)
        out = model(ids, compute_loss=False, keep_hidden=True)
        log_p = [F.log_softmax(model.readout(hidden).double(), dim=-1) for hidden in out.hidden_states]
        real = ids != PAD
        # kl_div(input=log p_l, target=log p_L) = sum_v p_L (log p_L - log p_l) = KL(p_L || p_l).
        kl = [F.kl_div(log_p_layer, log_p[-1], log_target=True, reduction="none").sum(-1)[real].mean()
              for log_p_layer in log_p]
    return torch.stack(kl).cpu().numpy()


def plot_logit_lens(curves: dict[str, np.ndarray], path: Path,
                    title: str = "LogitLens-KL: how early each layer is prediction-ready") -> Path:
    """One KL(p_L || p_l) curve per model (e.g. a Gengram model and its baseline twin) against depth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer l (0: the embedding)")
    ax.set_ylabel(r"KL($p_L\,\|\,p_l$) (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
