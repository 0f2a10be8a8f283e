"""Naive per-head loop references of every scoring formula, written from docs/method.md, in float64."""

from __future__ import annotations

import math

import torch


def importance(queries, query_valid, keys, candidates, kernel, scaling=None):
    batch, q_heads, window, _ = queries.shape
    kv_heads, slots, dim = keys.shape[1:]
    scaling = 1 / math.sqrt(dim) if scaling is None else scaling
    group = q_heads // kv_heads
    out = torch.zeros(batch, kv_heads, slots, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            cand = [j for j in range(slots) if candidates[b, h, j]]
            rows = [t for t in range(window) if query_valid[b, t]]
            mean = [0.0] * slots
            for t in rows:
                logits = {}
                for j in cand:
                    logits[j] = max(
                        float(queries[b, h * group + g, t].double() @ keys[b, h, j].double()) * scaling
                        for g in range(group)
                    )
                top = max(logits.values()) if logits else 0.0
                norm = sum(math.exp(v - top) for v in logits.values())
                for j, v in logits.items():
                    mean[j] += math.exp(v - top) / norm / len(rows)
            for rank, j in enumerate(cand):  # pooled along token order over the candidates only
                lo, hi = max(0, rank - kernel // 2), min(len(cand), rank + kernel // 2 + 1)
                out[b, h, j] = max(mean[c] for c in cand[lo:hi])
    return out


def redundancy(keys, valid, threshold):
    batch, kv_heads, slots, _ = keys.shape
    out = torch.zeros(batch, kv_heads, slots, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            idx = [i for i in range(slots) if valid[b, h, i]]
            unit = {i: keys[b, h, i].double() / (keys[b, h, i].double().norm() + 1e-8) for i in idx}
            sim = {(i, j): float(unit[i] @ unit[j]) if i != j else 0.0 for i in idx for j in idx}
            for i in idx:
                similar = [j for j in idx if j != i and sim[i, j] > threshold]
                if similar:
                    sim[i, max(similar)] = 0.0
            col = {j: sum(sim[i, j] for i in idx) / len(idx) for j in idx}
            top = max(col.values())
            norm = sum(math.exp(v - top) for v in col.values())
            for j in idx:
                out[b, h, j] = math.exp(col[j] - top) / norm
    return out


def received_attention(query, keys, allowed, scaling):
    batch, q_heads, length, _ = query.shape
    kv_heads, slots = keys.shape[1:3]
    group = q_heads // kv_heads
    out = torch.zeros(batch, kv_heads, slots, dtype=torch.float64)
    for b in range(batch):
        for hq in range(q_heads):
            h = hq // group
            for t in range(length):
                seen = [j for j in range(slots) if allowed[b, h, t, j]]
                if not seen:  # a query that may see nothing pays no attention
                    continue
                logits = {j: float(query[b, hq, t].double() @ keys[b, h, j].double()) * scaling for j in seen}
                top = max(logits.values())
                norm = sum(math.exp(v - top) for v in logits.values())
                for j, v in logits.items():
                    out[b, h, j] += math.exp(v - top) / norm
    return out


def select_adaptive(scores, valid, window, total, floor, ceiling):
    """The head-adaptive rule of docs/method.md, one row at a time: each head ranks its valid slots (window first,
    then by score, earlier slot first on ties); its first ``floor`` are kept; the remaining ``total`` minus those go
    to the best-scored ranks below ``ceiling`` across heads."""
    batch, heads, slots = scores.shape
    keep = torch.zeros(batch, heads, slots, dtype=torch.bool)
    window = window.expand(batch, heads, slots)
    for b in range(batch):
        ranked = {}
        for h in range(heads):
            real = [j for j in range(slots) if valid[b, h, j]]
            ranked[h] = sorted(real, key=lambda j: (not window[b, h, j], -float(scores[b, h, j]), j))
        left = total
        for h in range(heads):
            for j in ranked[h][:floor]:
                keep[b, h, j] = True
                left -= 1
        contest = [(float(scores[b, h, j]), h, j) for h in range(heads) for j in ranked[h][floor:ceiling]]
        for _, h, j in sorted(contest, key=lambda c: -c[0])[: max(left, 0)]:
            keep[b, h, j] = True
    return keep


def triattention(keys, pos, candidates, center, magnitude, omega, amplitude, rotary, now, offsets):
    """TriAttention's score as its reference computes it: each post-RoPE key un-rotated at its own position, then per
    query head and pair ``|c||k| cos(omega (now - p + o) + arg c - arg k)`` averaged over the offsets, plus
    ``(m - |c|) |k|``; z-normalised over the candidates (population std, at least 1e-6); max over the group."""
    batch, kv_heads, slots, dim = keys.shape
    q_heads, pairs = center.shape[1], dim // 2
    group = q_heads // kv_heads
    half, rest = rotary // 2, (dim - rotary) // 2
    index = [(f, f + half) if f < half else (rotary + f - half, rotary + rest + f - half) for f in range(pairs)]

    def pair(vector, f):
        re, im = index[f]
        return complex(float(vector[re]), float(vector[im]))

    out = torch.full((batch, kv_heads, slots), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            cand = [s for s in range(slots) if candidates[b, h, s]]
            for g in range(group):
                q = h * group + g
                scores = {}
                for s in range(slots):
                    total = 0.0
                    for f in range(pairs):
                        w, a = float(omega[f]), float(amplitude[f])
                        key = (
                            pair(keys[b, h, s].double(), f)
                            / a
                            * complex(math.cos(-w * float(pos[b, h, s])), math.sin(-w * float(pos[b, h, s])))
                        )  # un-rotated at its own position
                        c = pair(center[b if center.shape[0] > 1 else 0, q].double(), f)
                        phi = math.atan2(c.imag, c.real) - math.atan2(key.imag, key.real)
                        trig = sum(
                            math.cos(w * (float(now[b]) - float(pos[b, h, s]) + o) + phi) for o in offsets
                        ) / len(offsets)
                        m = float(magnitude[b if magnitude.shape[0] > 1 else 0, q, f])
                        total += abs(c) * abs(key) * trig + (m - abs(c)) * abs(key)
                    scores[s] = total
                values = [scores[s] for s in cand]
                mean = sum(values) / max(len(values), 1)
                std = max(math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values), 1)), 1e-6)
                for s in range(slots):
                    out[b, h, s] = max(out[b, h, s], (scores[s] - mean) / std)
    return out


def latent_importance(queries, query_valid, latents, rope_keys, key_up, candidates, kernel, scaling):
    """R-KV importance of an MLA layer the way the stock model computes its logits: each head's key expanded from the
    latent, [W_uk_h c_j, r_j], against the head's whole query [q_nope, q_rope]; the max over heads (one latent head
    serves them all) then softmax, window mean and max-pool as for any KV head. queries [B, H, W, nope + rope],
    latents [B, 1, S, rank], rope_keys [B, 1, S, rope], key_up [H, nope, rank]."""
    batch, heads, window, _ = queries.shape
    slots = latents.shape[2]
    out = torch.zeros(batch, 1, slots, dtype=torch.float64)
    for b in range(batch):
        cand = [j for j in range(slots) if candidates[b, 0, j]]
        rows = [t for t in range(window) if query_valid[b, t]]
        mean = [0.0] * slots
        for t in rows:
            logits = {}
            for j in cand:
                per_head = []
                for h in range(heads):
                    key = torch.cat([key_up[h].double() @ latents[b, 0, j].double(), rope_keys[b, 0, j].double()])
                    per_head.append(float(queries[b, h, t].double() @ key) * scaling)
                logits[j] = max(per_head)
            top = max(logits.values()) if logits else 0.0
            norm = sum(math.exp(v - top) for v in logits.values())
            for j, v in logits.items():
                mean[j] += math.exp(v - top) / norm / len(rows)
        for rank, j in enumerate(cand):  # pooled along token order over the candidates only
            lo, hi = max(0, rank - kernel // 2), min(len(cand), rank + kernel // 2 + 1)
            out[b, 0, j] = max(mean[c] for c in cand[lo:hi])
    return out
