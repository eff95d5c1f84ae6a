"""Mutation check of the method's rules: break one rule at a time, see a fast test fail.

Each mutant is one textual replacement in a copy of ``src/`` that violates one rule of
docs/ekg-method.md at the place the code uses it (the old text must occur exactly once, so a
mutant never silently does nothing). For each mutant the script copies ``src/``, ``tests/`` and
``pyproject.toml`` to a temporary folder, applies the replacement, runs the fast tests listed for
that rule (``pytest -x -q -m "not slow"`` with ``PYTHONPATH`` at the mutated copy) and reports
whether they failed (the mutant is *killed*) or all passed (it *SURVIVED*: no fast test guards
that rule). The unmutated copy is run first on the union of the listed tests (the baseline): a
failing baseline would make every kill meaningless.

    python bench/mutants.py                  # every mutant, its listed tests (about 10 minutes on 2 cores)
    python bench/mutants.py --list           # the mutants and their rules
    python bench/mutants.py --check          # only check that each old text occurs once in its file
    python bench/mutants.py --only bank-includes-final --only winner-highest-reward
    python bench/mutants.py --all-tests      # the whole fast suite per mutant (much longer)
    python bench/mutants.py --jobs 2         # mutants in parallel

Exit status 0 when every mutant is killed, 1 when any survived (or the baseline failed).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

R = "tests/test_rules_in_use.py::"
K0 = R + "test_k_starts_as_the_unpruned_networks_batch_statistics_logits"
WIN = R + "test_the_winner_is_the_candidate_with_the_lowest_reward"
KMEAN = R + "test_k_is_the_running_mean_of_the_winners_logits"
HIST = R + "test_the_history_records_the_winners_ce_loss"
SCORES = R + "test_the_scores_of_a_step_are_taylor_scores_of_j_with_k"
OTSU = R + "test_a_step_evaluates_exactly_the_otsu_candidates_with_the_step_size"
NOOTSU = R + "test_without_otsu_every_group_is_a_candidate_one_step_of_max_1_over_c_0_2_over_n_down"
ONE_CHANNEL = R + "test_a_group_down_to_one_channel_is_no_candidate"
WEIGHTS = R + "test_weight_criteria_score_masked_channels_zero_in_the_step"
LAND = R + "test_landing_never_above_keep_and_the_search_stops_there"
MODES = R + "test_the_search_leaves_module_modes_and_bn_running_statistics_as_it_found_them"
UNIFORM = R + "test_uniform_evaluates_on_batch_statistics"
ADAPT = R + "test_prune_adapts_one_epoch_over_d_sub_and_searches_on_d_val_in_256_plus_64"
SDEF = R + "test_search_defaults_of_the_api_and_of_ekg_prune"
FTCFG = R + "test_ekg_finetune_and_ekg_run_paper_build_the_papers_finetuning_recipe"
BANK = R + "test_bank_for_run_excludes_the_final_subnetwork_spreads_teachers_and_runs_bn_on_batches_of_256"
SCHED = R + "test_the_trainer_applies_the_step_schedule"
KDSTEP = R + "test_a_kd_step_of_the_trainer_equals_a_hand_written_step"
PLAIN = R + "test_plain_finetuning_step_is_one_view_and_mean_ce"
TEMP = R + "test_the_kd_temperature_is_4_for_cifar_and_10_for_1000_classes"
EVAL = R + "test_ekg_test_and_evaluate_use_running_statistics_by_default"
SEARCH_BN = "tests/test_search_bn.py::test_the_searcher_sets_bn_whatever_mode_the_caller_left[eval]"  # main's, if present
RULES = "tests/test_search_rules.py::"
SAFE = "tests/test_run_safety.py::"
LOCK = SAFE + "test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over"
REENTRANT = SAFE + "test_the_lock_is_reentrant_in_one_process_and_leaves_nothing_behind"
FULL_BANK = SAFE + "test_the_bank_on_a_full_disk_is_refused_before_any_teacher_runs_and_builds_afterwards"
LN = "tests/test_layernorm.py::"
FLOOR = "tests/test_search_rules.py::test_the_floor_of_the_budget_is_every_group_at_one_channel"
EXACT = RULES + "test_the_optimised_search_takes_bit_identical_steps_to_the_straightforward_one[method]"
REUSE = RULES + "test_sliced_layers_reuse_weights_only_for_the_same_masks_and_unchanged_weights"
PHASE = RULES + "test_each_search_phase_starts_without_held_weights"
BAD = "tests/test_bad_input.py::test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing["
G = "tests/test_grouped.py::"
G_GRAPH = G + "test_a_grouped_conv_cuts_what_it_reads_and_writes_in_equal_blocks"
G_LCM = G + "test_blocks_are_the_lcm_where_grouped_convs_of_different_groups_meet"
G_GATE = G + "test_a_blocked_gate_keeps_its_best_ranked_channels_block_by_block"
G_SLIM = G + "test_slim_equals_masked_and_the_cost_is_counted"
G_COLS = G + "test_a_slim_grouped_conv_takes_the_columns_of_its_blocks_kept_inputs"
G_UNEVEN = G + "test_slimming_refuses_a_grouped_conv_cut_unevenly_naming_it"
G_STEP = G + "test_a_blocked_groups_step_is_max_1_over_units_0_2_over_n_and_removes_a_unit"
G_ONE = G + "test_a_blocked_group_down_to_one_channel_a_block_is_no_candidate"
G_FLOOR = G + "test_the_floor_is_every_blocked_group_at_one_channel_a_block"
RT = "tests/test_round_to.py::"
RT_WIDTHS = RT + "test_kept_widths_are_multiples_of_n_or_the_full_width"
RT_UNIT = RT + "test_the_unit_is_the_lcm_of_the_blocks_and_n"
RT_LAND = RT + "test_rounded_searches_land_on_multiples_at_or_just_below_the_budget"
RT_COST = RT + "test_the_step_cost_of_rounded_widths_sums_the_channels_they_drop"
RT_FLOOR = RT + "test_the_floor_counts_one_unit_per_group_and_is_checked_up_front"
RT_E2E = RT + "test_ekg_prune_round_to_8_end_to_end"
LB = "tests/test_latency_budget.py::"
LB_SAME = LB + "test_on_a_flops_proportional_table_the_latency_budget_makes_the_flops_budgets_decisions"
LB_LAND = LB + "test_a_latency_budget_lands_at_or_just_below_it_in_predicted_latency"
LB_E2E = LB + "test_ekg_prune_on_a_latency_budget_end_to_end"
LB_TEST = LB + "test_ekg_test_predicts_and_measures_the_speed_up_on_the_target"
LB_REFIT = LB + "test_a_landing_measured_above_the_budget_is_refitted_and_searched_on"
LB_FLAT = LB + "test_a_landing_measured_slower_than_a_wider_network_is_searched_on_below_it"
LT_FORMAT = "tests/test_latency.py::test_units_and_comparisons_run_in_the_targets_format"
LT_KEY = "tests/test_latency.py::test_the_cache_key_names_every_setting_a_timing_depends_on"


@dataclass(frozen=True)
class Mutant:
    name: str
    rule: str
    file: str        # under src/
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutant
MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- phase 2: the greedy step
    M("winner-highest-reward", "the winner is the candidate with the lowest reward", "ekg/search/searcher.py",
      "if best is None or r < best[0]:", "if best is None or r > best[0]:", (WIN,)),
    M("winner-first-candidate", "the winner is the candidate with the lowest reward", "ekg/search/searcher.py",
      "if best is None or r < best[0]:", "if best is None:", (WIN,)),
    M("reward-kinds-swapped", "reward 'ensemble' is J, 'val-loss' is CE", "ekg/search/evaluator.py",
      'return self.j if kind == "ensemble" else self.loss', 'return self.loss if kind == "ensemble" else self.j',
      (WIN,)),
    M("reward-j-without-k", "J = CE(labels, z) + CE(softmax(K), z) in the reward", "ekg/search/evaluator.py",
      "stats[b] = torch.stack([F.cross_entropy(z.float(), y, reduction=\"sum\"), objective(z, y, k),",
      "stats[b] = torch.stack([F.cross_entropy(z.float(), y, reduction=\"sum\"), objective(z, y, None),",
      (WIN,)),
    M("k-init-zeros", "K starts as the unpruned network's D_val logits", "ekg/search/searcher.py",
      "ensemble=logits, ensemble_count=1", "ensemble=torch.zeros_like(logits), ensemble_count=1", (K0,)),
    M("k-init-count-zero", "K counts the unpruned network (t = 1 after step 0)", "ekg/search/searcher.py",
      "ensemble=logits, ensemble_count=1", "ensemble=logits, ensemble_count=0", (KMEAN,)),
    M("k-not-updated", "K ← (K·t + z_winner)/(t+1) after each step", "ekg/search/searcher.py",
      "state.ensemble = update_ensemble(state.ensemble, self.evaluator.gather(ev.parts), state.ensemble_count)",
      "state.ensemble = state.ensemble", (KMEAN,)),
    M("k-ema-not-mean", "K is the running mean (K·t + z)/(t+1), not an EMA", "ekg/search/ensemble.py",
      "return (ensemble * count + logits) / (count + 1)", "return (ensemble + logits) / 2", (KMEAN,)),
    M("k-count-frozen", "t counts the sub-networks averaged in K", "ekg/search/searcher.py",
      "state.ensemble_count += 1", "state.ensemble_count += 0", (KMEAN,)),
    M("k-and-history-of-last-candidate", "K and the history take the winner's evaluation", "ekg/search/searcher.py",
      "_, winner, new_rate, ev = best", "_, winner, new_rate, _ = best", (KMEAN, HIST)),
    M("history-records-j", "the history records the winner's CE loss", "ekg/search/searcher.py",
      'state.history.append({"step": state.step, "masks": pack_masks(self.net), "rates": state.rates,\n'
      '                              "loss": ev.loss',
      'state.history.append({"step": state.step, "masks": pack_masks(self.net), "rates": state.rates,\n'
      '                              "loss": ev.j', (HIST,)),
    M("history-records-previous-loss", "the history records the winner's CE loss", "ekg/search/searcher.py",
      'state.history.append({"step": state.step, "masks": pack_masks(self.net), "rates": state.rates,\n'
      '                              "loss": ev.loss',
      'state.history.append({"step": state.step, "masks": pack_masks(self.net), "rates": state.rates,\n'
      '                              "loss": state.history[-1]["loss"]', (HIST,)),
    M("scores-without-k", "the step's scores are Taylor scores of J with K", "ekg/search/searcher.py",
      'k = state.ensemble if imp == "ekg" else None', "k = None", (SCORES,)),
    M("scores-plain-ce", "Taylor scores back-propagate J, not CE", "ekg/search/scores.py",
      "(objective(out, y, k) / nominal_batch).backward()",
      "(F.cross_entropy(out, y, reduction=\"sum\") / nominal_batch).backward()", (SCORES,)),
    M("scores-abs-after-sum", "|Σ g·y| per batch and mask point", "ekg/masks.py",
      "ctx.score.add_((g * y).sum(dims).abs().to(ctx.score.dtype))",
      "ctx.score.add_((g * y).sum(dims).to(ctx.score.dtype))", (SCORES,)),
    M("otsu-off", "the Otsu candidate filter is applied in the step", "ekg/search/searcher.py",
      "threshold = trimmed_otsu_threshold(list(costs.values()), cfg.otsu_trim) if cfg.otsu else math.inf",
      "threshold = math.inf", (OTSU,)),
    M("otsu-keeps-costly-groups", "candidates: cost at or below the Otsu threshold", "ekg/search/searcher.py",
      "candidates = [i for i in active if costs[i] <= threshold] or active",
      "candidates = [i for i in active if costs[i] >= threshold] or active", (OTSU,)),
    M("otsu-untrimmed", "drop the lowest and highest 20% of the costs before Otsu", "ekg/search/searcher.py",
      "trimmed_otsu_threshold(list(costs.values()), cfg.otsu_trim)",
      "trimmed_otsu_threshold(list(costs.values()), 0.0)", (OTSU,)),
    M("cost-of-a-base-step", "a group's cost is that of its own next step", "ekg/search/searcher.py",
      "costs = {i: self._step_cost(gates[i], scores[i], steps[i]) for i in active}",
      "costs = {i: self._step_cost(gates[i], scores[i], cfg.step) for i in active}", (OTSU,)),
    M("step-size-ignores-producers", "step size max(1/C, 0.2/n), n = producing layers", "ekg/search/searcher.py",
      "steps = [step_size(g.units, g.n_producers, cfg.step) for g in gates]",
      "steps = [step_size(g.units, 1, cfg.step) for g in gates]", (NOOTSU, OTSU)),
    M("step-size-without-1-over-c", "step size max(1/C, 0.2/n)", "ekg/search/steps.py",
      "return max(1.0 / channels, base / max(1, n_producers))", "return base / max(1, n_producers)", (NOOTSU, OTSU)),
    M("one-channel-groups-stepped", "only groups still above one channel are candidates", "ekg/search/searcher.py",
      "active = [i for i, g in enumerate(gates) if g.kept > g.unit]",
      "active = [i for i, g in enumerate(gates) if g.kept > 0]",
      (ONE_CHANNEL,)),
    M("landing-skipped", "an overshooting step lands just at or below keep", "ekg/search/searcher.py",
      "new_rate = land_rate(gate.rate, steps[i], gate.units, ratio_at, cfg.keep)",
      "new_rate = round(gate.rate - steps[i], 5)", (LAND,)),
    M("landing-above-keep", "landing is never above keep", "ekg/search/steps.py",
      "        best = up\n    return best",
      "        best = up\n    return round(best + 1 / channels, 9) if best + 1 / channels < rate - 1e-9 else best",
      (LAND,)),
    M("ranks-ignore-live-channels", "masked channels rank last: pruning is monotone", "ekg/search/searcher.py",
      "gate.ranks = ranks_from_scores(s, live=gm.mask.bool())", "gate.ranks = ranks_from_scores(s)",
      (RULES + "test_step_never_revives_a_masked_channel_dead_relu",)),
    M("weight-scores-of-masked-channels", "masked channels score 0 (weight criteria too)", "ekg/search/scores.py",
      "out.append(torch.where(keep, s, torch.zeros_like(s)))", "out.append(s)", (WEIGHTS,)),
    # ---------------------------------------------------------------- what a mask does
    M("mask-points-first-only", "a group is masked at every one of its activation outputs", "ekg/graph.py",
      "g.mask_nodes += acts.get(s, [])", "g.mask_nodes += acts.get(s, [])[:1]", (SCORES, WIN)),
    M("mask-points-at-bn-too", "mask points are the activation outputs, not the BN outputs", "ekg/graph.py",
      "pass_through(node, node.args[0], isinstance(m, _ACT_MODULES))",
      "pass_through(node, node.args[0], isinstance(m, _ACT_MODULES + (nn.BatchNorm2d,)))", (SCORES,)),
    M("no-rescale-full-width", "norm-preserving rescale (W⊙M)·‖W‖/‖W⊙M‖", "ekg/masks.py",
      "return mw * (w.norm() / mw.norm().clamp_min(1e-30))", "return mw",
      (RULES + "test_effective_weight_is_norm_preserving", WIN)),
    M("no-rescale-sliced", "norm-preserving rescale in the search's sliced layers", "ekg/masks.py",
      "ws = ws * (w.norm() / ws.norm().clamp_min(1e-30))\n        return ws, b, cols",
      "return ws, b, cols", (NOOTSU, WIN)),
    # ---------------------------------------------------------------- the search's re-use of work (same numbers)
    M("weight-reuse-ignores-out-mask", "a sliced layer re-uses its kept weights only for the same mask contents",
      "ekg/masks.py", "key = (m_in.token if m_in is not None else None, m_out.token if m_out is not None else None)",
      "key = (m_in.token if m_in is not None else None, None)", (EXACT, REUSE)),
    M("weight-reuse-mask-token-constant", "a mask's token is its content", "ekg/masks.py",
      "self.token = host.numpy().tobytes() if self.partial else None",
      'self.token = b"partial" if self.partial else None', (EXACT, REUSE)),
    M("weight-reuse-ignores-weight-version", "held weights are used only while the weight is unchanged",
      "ekg/masks.py", "stamp = tuple((t.device, t.data_ptr(), t._version, t.stride(), t.dtype) for t in params)",
      "stamp = tuple((t.device, t.data_ptr(), t.stride(), t.dtype) for t in params)", (REUSE,)),
    M("weight-reuse-with-weight-gradient", "no re-use when a gradient w.r.t. the weights is wanted", "ekg/masks.py",
      "or (torch.is_grad_enabled() and any(t.requires_grad for t in params))):",
      "or False):", (REUSE,)),
    M("weight-reuse-across-steps", "held weights live one search phase", "ekg/search/searcher.py",
      "        t0 = time.perf_counter()\n        self.net.clear_weight_cache()  # held weights live one phase",
      "        t0 = time.perf_counter()\n        pass  # held weights live one phase", (PHASE,)),
    M("no-rescale-in-slim", "slimming bakes in the norm-preserving rescale", "ekg/slim.py",
      "return sliced * (full.norm() / norm)", "return sliced", ("tests/test_slim.py",)),
    M("slim-bn-statistics-of-other-channels", "slimming keeps the surviving channels' BN running statistics",
      "ekg/slim.py", "setattr(m, attr, b[index].clone())", "setattr(m, attr, b[: len(index)].clone())",
      ("tests/test_slim.py",)),
    # ---------------------------------------------------------------- channels-last LayerNorm blocks (ConvNeXt)
    M("ln-statistics-over-all-channels", "a masked LayerNorm normalises over the kept channels only", "ekg/masks.py",
      "keep = mask.mask.to(x.dtype)", "keep = torch.ones_like(mask.mask).to(x.dtype)",
      (LN + "test_the_masked_layer_norm_is_the_slim_layer_norm_for_random_cuts",
       LN + "test_a_convnext_cut_at_random_slims_to_the_masked_network")),
    M("ln-sliced-statistics-over-all-channels", "the search's sliced LayerNorm normalises over the kept channels only",
      "ekg/masks.py", "y = F.layer_norm(x.index_select(-1, idx), (int(idx.numel()),), w, b, ln.eps)",
      "y = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps).index_select(-1, idx)",
      (LN + "test_the_masked_layer_norm_is_the_slim_layer_norm_for_random_cuts",
       LN + "test_a_convnext_cut_at_random_slims_to_the_masked_network")),
    M("ln-weight-not-cut-with-group", "slimming cuts a LayerNorm's weight and bias with its group's channels",
      "ekg/slim.py", "nn.Parameter(p.detach().index_select(0, index).clone()",
      "nn.Parameter(p.detach()[: len(index)].clone()",
      (LN + "test_a_convnext_cut_at_random_slims_to_the_masked_network",)),
    M("permute-channel-dim", "a permute moves the channels to the dim they are permuted to", "ekg/graph.py",
      "dims[node.name] = perm.index(d)", "dims[node.name] = perm[d]",
      (LN + "test_convnext_groups_follow_the_channels_through_permutes_and_layer_norms",)),
    M("ln-stream-adds-only", "a LayerNorm'd stream is masked at its block inputs (stem, downsampling) too",
      "ekg/graph.py", "points.add(fork)", "pass",
      (LN + "test_convnext_groups_follow_the_channels_through_permutes_and_layer_norms",)),
    M("mask-point-channel-dim", "a mask point masks the channel dim (the last one of channels-last values)",
      "ekg/masks.py", "shape[dim] = -1", "shape[1] = -1",
      (LN + "test_a_convnext_cut_at_random_slims_to_the_masked_network",)),
    M("sliced-linear-channel-dim", "a sliced linear layer reads its kept inputs from the last dim", "ekg/masks.py",
      "x = x.index_select(self.dim, cols)", "x = x.index_select(1, cols)",
      (LN + "test_a_convnext_cut_at_random_slims_to_the_masked_network",)),
    M("flatten-module-freezes", "nn.Flatten() passes the channels like torch.flatten(x, 1)", "ekg/graph.py",
      "elif isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1)",
      "elif isinstance(m, nn.Unflatten) and (m.start_dim, m.end_dim) == (1, -1)",
      ("tests/test_zoo.py::test_a_flatten_module_passes_the_channels_like_torch_flatten",)),
    M("flatten-module-no-blocks", "nn.Flatten() of an (N, C, H, W) map passes blocks of H·W columns", "ekg/graph.py",
      "                    block[node.name] = int(np.prod(shape(node.args[0])[2:]))",
      "                    pass", ("tests/test_zoo.py::test_a_flatten_module_passes_the_channels_like_torch_flatten",)),
    # ---------------------------------------------------------------- grouped convs (equal blocks)
    M("grouped-blocks-ignored", "a grouped conv cuts the groups it reads and writes in G equal blocks", "ekg/graph.py",
      "    blocks = math.lcm(*(g for _, g in convs)) if convs else 1", "    blocks = 1", (G_GRAPH, G_SLIM)),
    M("grouped-blocks-max-not-lcm", "where grouped convs meet, the blocks are the lcm of their groups", "ekg/graph.py",
      "    blocks = math.lcm(*(g for _, g in convs)) if convs else 1",
      "    blocks = max((g for _, g in convs), default=1)", (G_LCM, G_SLIM)),
    M("grouped-block-mask-global-top-k", "a blocked gate keeps its best-ranked kept/B channels of every block",
      "ekg/masks.py", "    return (within < kept // blocks).flatten()", "    return ranks < kept", (G_GATE, G_SLIM)),
    M("grouped-cost-ignores-groups", "a grouped conv costs cout·cin/G pairs", "ekg/graph.py",
      'pairs = cout if layer.kind == "dwconv" else cin * cout // layer.groups',
      'pairs = cout if layer.kind == "dwconv" else cin * cout', (G_SLIM,)),
    M("grouped-masked-kernel-one-block", "a grouped conv's input mask is taken block by block", "ekg/masks.py",
      "per_block = per_channel.view(g, 1, -1).expand(g, out // g, -1)",
      "per_block = per_channel[: per_channel.numel() // g].view(1, 1, -1).expand(g, out // g, -1)", (G_SLIM, G_COLS)),
    M("grouped-columns-of-other-blocks", "a kept output of block g takes block g's kept input columns", "ekg/masks.py",
      "cols = local.repeat_interleave(rows // groups, dim=0)", "cols = local.repeat(rows // groups, 1)",
      (G_COLS, G_SLIM)),
    M("grouped-no-rescale-sliced", "norm-preserving rescale in the search's sliced grouped convs", "ekg/masks.py",
      "rescaled = ws * (w.norm() / ws.norm().clamp_min(1e-30))  # the norm-preserving kernel", "rescaled = ws",
      (G_SLIM, G_COLS)),
    M("grouped-slim-uneven-blocks", "a grouped conv keeps as many channels in every group", "ekg/slim.py",
      "    if bool((counts != counts[0]).any()):", "    if False:", (G_UNEVEN,)),
    M("grouped-step-cost-global", "a blocked group's step cost sums what each block loses", "ekg/search/searcher.py",
      "            return step_cost(scores, gate.rate, step, gate.blocks)",
      "            return step_cost(scores, gate.rate, step)", (G_STEP,)),
    M("grouped-step-size-in-channels", "a blocked group's step is max(1/units, 0.2/n)", "ekg/search/searcher.py",
      "steps = [step_size(g.units, g.n_producers, cfg.step) for g in gates]",
      "steps = [step_size(g.channels, g.n_producers, cfg.step) for g in gates]", (G_STEP,)),
    M("grouped-step-keeps-every-unit", "a blocked group's step removes at least one unit", "ekg/search/searcher.py",
      "                    new_rate = drop_a_unit(gate.rate, new_rate, gate.units)", "                    pass",
      (G_STEP,)),
    M("grouped-one-unit-stepped", "a blocked group at one channel a block is no candidate", "ekg/search/searcher.py",
      "active = [i for i, g in enumerate(gates) if g.kept > g.unit]",
      "active = [i for i, g in enumerate(gates) if g.kept > 1]", (G_ONE,)),
    M("grouped-floor-one-channel", "the floor: every blocked group at one channel a block", "ekg/search/searcher.py",
      "        widths[g.index] = min(g.channels, math.lcm(g.blocks, cfg.round_to))\n", "        widths[g.index] = 1\n",
      (G_FLOOR,)),
    # ---------------------------------------------------------------- --round-to N
    M("round-to-no-partial-unit", "a width the unit does not divide keeps its full width as its last unit",
      "ekg/masks.py", "    return min(channels, unit * kept_channels(-(-channels // unit), rate))",
      "    return min(channels, unit * kept_channels(max(1, channels // unit), rate))", (RT_WIDTHS, RT_LAND)),
    M("round-to-unit-ignores-n", "a rounded gate's unit is lcm(blocks, N)", "ekg/masks.py",
      "        return math.lcm(self.group.blocks, self.round_to)", "        return self.group.blocks",
      (RT_UNIT, RT_LAND)),
    M("round-to-step-cost-by-rate", "a rounded gate's step cost sums the channels its rounded widths drop",
      "ekg/search/searcher.py",
      "        return removed_cost(scores, gate.kept, gate.kept_at(after), gate.blocks)",
      "        return step_cost(scores, gate.rate, step, gate.blocks)", (RT_COST,)),
    M("round-to-floor-ignores-n", "the floor: every rounded group at one unit of N", "ekg/search/searcher.py",
      "        widths[g.index] = min(g.channels, math.lcm(g.blocks, cfg.round_to))\n",
      "        widths[g.index] = g.blocks\n", (RT_FLOOR,)),
    M("round-to-not-passed", "ekg.prune builds its gates with the config's round_to", "ekg/pruning.py",
      "round_to=cfg.round_to)", ")", (RT_E2E,)),
    # ---------------------------------------------------------------- --budget latency
    M("latency-budget-reads-flops", "a latency budget lands and stops on the predicted latency ratio",
      "ekg/search/searcher.py", "        if self.latency is not None:\n            return self.latency.ratio(",
      "        if False:\n            return self.latency.ratio(", (LB_LAND,)),
    M("latency-budget-uncalibrated", "the prediction is the table's sum calibrated on two measurements",
      "ekg/latency.py", "            return self.full_ms + self.scale * (u - self.full_units_ms)",
      "            return self.full_ms + (u - self.full_units_ms)", (LB_LAND,)),
    M("latency-sum-stale-rows", "the table's sum looks up every row whose widths changed", "ekg/latency.py",
      "                    vals[k] = self._row_ms(self.rows[k], w)", "                    pass", (LB_LAND, LB_SAME)),
    M("latency-resume-retimes", "a resumed latency search predicts with the run directory's model",
      "ekg/pruning.py", "    if resume and rd.latency.exists():\n        lat = saved_latency_model(",
      "    if False:\n        lat = saved_latency_model(", (LB_E2E,)),
    M("latency-floor-unchecked", "a latency budget below its floor is refused before any work", "ekg/pruning.py",
      "        if cfg.keep < floor:\n", "        if False:\n", (LB_E2E,)),
    M("latency-test-predicts-full", "ekg test predicts the model's widths' speed-up", "ekg/cli/test.py",
      "        widths = slim_widths(base_graph, model)\n", "        widths = base_graph.full_widths()\n", (LB_TEST,)),
    M("latency-refit-not-added", "a landing measured too slow joins the latency model before the search goes on",
      "ekg/pruning.py", "        latency.refit(widths, measured * latency.full_ms)\n", "", (LB_REFIT,)),
    M("latency-landing-never-refitted", "a landing measured more than the tolerance above keep is searched on",
      "ekg/pruning.py", "        if measured <= keep * (1 + LATENCY_TOLERANCE) or k == refits or one_shot:",
      "        if True:", (LB_REFIT,)),
    M("latency-accepted-measured-again", "an accepted landing is not measured again", "ekg/pruning.py",
      "        if latency.accepted is not None and latency.accepted[\"widths\"] == widths:",
      "        if False:", (LB_REFIT,)),
    M("latency-refit-point-ignored", "a refitted prediction passes through every measured landing", "ekg/latency.py",
      "            pts += [(self.units_ms(w), ms) for w, ms in self.refits]\n", "", (LB_REFIT,)),
    M("latency-refit-flat-floor", "below the cheapest measured point the prediction falls at least as the line",
      "ekg/latency.py", "            return m0 + max(slope, self.scale) * (u - u0)",
      "            return m0 + slope * (u - u0)", (LB_FLAT,)),
    M("latency-format-not-deployed", "units and comparisons run in the target's dtype and memory format",
      "ekg/latency.py", "        module = module.to(device=self.device, dtype=self.torch_dtype).eval()",
      "        module = module.to(device=self.device).eval()", (LT_FORMAT,)),
    M("latency-format-not-in-key", "a table's key names the target's format", "ekg/latency.py",
      "    if t.dtype != \"float32\":\n        key[\"dtype\"] = t.dtype\n", "", (LT_KEY,)),
    M("latency-format-mutates-model", "timing the full network leaves the caller's model as it was",
      "ekg/latency.py", "lambda: copy.deepcopy(model))", "lambda: model)", (LT_FORMAT,)),
    M("study-perturb-across-blocks", "a study's perturbation swaps within each block of a grouped group",
      "ekg/study.py", "        n_blocks = (blocks or {}).get(gi, 1)", "        n_blocks = 1",
      ("tests/test_study.py::test_perturb_swaps_within_each_block_of_a_grouped_group",)),
    # ---------------------------------------------------------------- BN modes
    M("search-bn-running", "the search runs BN on batch statistics", "ekg/search/searcher.py",
      "return bn_mode(self.net.model, self.cfg.search_bn)", 'return bn_mode(self.net.model, "running")',
      (K0, WIN, SEARCH_BN)),
    M("search-bn-running-main-test", "the search runs BN on batch statistics (main's end-to-end test)",
      "ekg/search/searcher.py", "return bn_mode(self.net.model, self.cfg.search_bn)",
      'return bn_mode(self.net.model, "running")', (SEARCH_BN,)),
    M("search-step-without-bn-mode", "every step runs BN on batch statistics", "ekg/search/searcher.py",
      "        with self.bn():\n            return self._step(state)", "        return self._step(state)",
      (WIN, SEARCH_BN)),
    M("search-initial-without-bn-mode", "step 0 runs BN on batch statistics", "ekg/search/searcher.py",
      "        with self.bn():\n            return self._initial_state()", "        return self._initial_state()",
      (K0, SEARCH_BN)),
    M("search-uniform-without-bn-mode", "the uniform baseline runs BN on batch statistics", "ekg/search/searcher.py",
      "        with self.bn():\n            return self._uniform(state)", "        return self._uniform(state)",
      (UNIFORM,)),
    M("inference-modes-restore-model-train", "each module restored to its own mode, never model.train(was)",
      "ekg/bn.py",
      "        for m, training in saved:\n            m.training = training",
      "        model.train(saved[0][1])", (MODES,)),
    M("batch-bn-updates-running-stats", "batch-statistics BN leaves running statistics untouched", "ekg/bn.py",
      "                getattr(m, k).copy_(v)", "                pass", (MODES,)),
    M("bank-bn-inference-mode", "the bank runs BN on batch statistics", "ekg/bank.py",
      "from .evaluate import batch_statistics_bn", "from .bn import inference_modes as batch_statistics_bn", (BANK,)),
    M("eval-default-batch-bn", "evaluation: BN in inference mode by default", "ekg/evaluate.py",
      'device: torch.device | str = "cpu", bn_mode: str = "running", dist: Dist | None = None)',
      'device: torch.device | str = "cpu", bn_mode: str = "batch", dist: Dist | None = None)', (EVAL, KDSTEP)),
    M("eval-model-left-in-train-mode", "evaluation: BN in inference mode", "ekg/evaluate.py",
      "    model.eval()\n    ctx = batch_statistics_bn(model)", "    ctx = batch_statistics_bn(model)", (EVAL,)),
    M("cli-test-default-batch-bn", "`ekg test`: BN in inference mode by default", "ekg/cli/test.py",
      'p.add_argument("--bn", choices=BN_STATS, default=default_of(evaluate, "bn_mode"),',
      'p.add_argument("--bn", choices=BN_STATS, default="batch",', (EVAL,)),
    # ---------------------------------------------------------------- phase 3: the memory bank
    M("bank-includes-final", "the final sub-network is not a teacher", "ekg/bank.py",
      "candidates = history[:-1]", "candidates = history", (BANK,)),
    M("bank-teachers-paper-endpoints", "teachers spread evenly: targets L_min + k(L_max-L_min)/T", "ekg/bank.py",
      "target = lo + k * (hi - lo) / count", "target = lo + k * (hi - lo) / (count - 1)", (BANK,)),
    M("bank-unsorted-losses", "the history is sorted by val loss before the spread", "ekg/bank.py",
      "order = sorted(range(n), key=lambda i: (losses[i], i))", "order = list(range(n))", (BANK,)),
    M("bank-first-teachers", "teachers spread evenly in loss", "ekg/bank.py",
      'chosen = select_teachers([float(h["loss"]) for h in candidates], teachers)',
      "chosen = list(range(min(teachers, len(candidates))))", (BANK,)),
    M("bank-batch-128", "the bank's BN statistics come from batches of 256", "ekg/bank.py",
      "teachers: int | None = None, batch_size: int = 256,", "teachers: int | None = None, batch_size: int = 128,",
      (BANK,)),
    M("bank-batches-from-the-end", "the bank's batches follow dataset order", "ekg/bank.py",
      "mine = [range(n)[b * batch_size:(b + 1) * batch_size] for b in dist.shard(-(-n // batch_size))]",
      "mine = [range(n)[max(0, n - (b + 1) * batch_size):n - b * batch_size] for b in dist.shard(-(-n // batch_size))]",
      (BANK,)),
    M("bank-augmented", "the bank's images are unaugmented", "ekg/bank.py",
      "iterate_index_batches(data, mine, normalization=normalization,",
      "iterate_index_batches(ImageSet(data.images.flip(-1), data.labels, data.classes), mine, "
      "normalization=normalization,", (BANK,)),
    # ---------------------------------------------------------------- phase 1 and the search sets
    M("adapt-lr", "adaptation lr 1e-3", "ekg/search/config.py",
      "adapt_lr: float = 1e-3", "adapt_lr: float = 1e-2", (ADAPT,)),
    M("adapt-momentum", "adaptation momentum 0.9", "ekg/search/config.py",
      "adapt_momentum: float = 0.9", "adapt_momentum: float = 0.5", (ADAPT,)),
    M("adapt-weight-decay", "adaptation weight decay 5e-4", "ekg/search/config.py",
      "adapt_weight_decay: float = 5e-4", "adapt_weight_decay: float = 1e-4", (ADAPT,)),
    M("adapt-no-nesterov", "adaptation: SGD with Nesterov momentum", "ekg/search/adaptation.py",
      "momentum=cfg.adapt_momentum, nesterov=True", "momentum=cfg.adapt_momentum, nesterov=False", (ADAPT,)),
    M("adapt-bn-inference-mode", "adaptation: BN in training mode", "ekg/search/adaptation.py",
      "    model.train()\n    with synced_batchnorm(model, dist):", "    model.eval()\n    with synced_batchnorm(model, dist):",
      (ADAPT,)),
    M("adapt-summed-loss", "adaptation: mean CE (not the release's summed CE/128)", "ekg/search/adaptation.py",
      "                loss = F.cross_entropy(model(x), y)\n",
      '                loss = F.cross_entropy(model(x), y, reduction="sum") / 128\n', (ADAPT,)),
    M("adapt-two-epochs", "adaptation: one epoch", "ekg/search/adaptation.py",
      "        for x, y in batches:\n            if dist.enabled:", "        for x, y in list(batches) * 2:\n            if dist.enabled:",
      (ADAPT,)),
    M("adapt-batch-128", "adaptation: batch 256", "ekg/pruning.py",
      "    batch = adapt_cfg.batch_size\n", "    batch = 128\n", (ADAPT,)),
    M("adapt-augmented", "adaptation: no augmentation", "ekg/pruning.py",
      "iterate_batches(d_sub, batch, normalization=norm, drop_last=True,",
      "iterate_batches(d_sub, batch, normalization=norm, drop_last=True, "
      "augment=__import__('ekg.data').data.AugmentConfig(),", (ADAPT,)),
    M("adapt-on-d-val", "adaptation runs over D_sub", "ekg/pruning.py",
      "_adaptation(net_model, d_sub.to(device)", "_adaptation(net_model, d_val.to(device)",
      (ADAPT,)),
    M("d-val-first-32", "D_val: the last 32 images of each class", "ekg/search/sets.py",
      "val_parts.append(idx[::-1][:val_per_class])", "val_parts.append(idx[:val_per_class])", (ADAPT,)),
    M("d-val-unreversed", "D_val: the last 32 per class in the release's order", "ekg/search/sets.py",
      "val_parts.append(idx[::-1][:val_per_class])", "val_parts.append(idx[-val_per_class:])", (ADAPT,)),
    M("d-sub-last-256", "D_sub: the first 256 images of each class", "ekg/search/sets.py",
      "sub_parts.append(idx[:sub_per_class])", "sub_parts.append(idx[-sub_per_class:])", (ADAPT,)),
    M("d-val-unshuffled", "D_val is shuffled once with a fixed seed", "ekg/search/sets.py",
      "return _shuffled_subset(train, val_parts, seed), _shuffled_subset(train, sub_parts, seed)",
      "return train.subset(np.hstack(val_parts).astype(np.int64)), _shuffled_subset(train, sub_parts, seed)",
      (ADAPT,)),
    M("split-seed", "the search sets' fixed seed (1)", "ekg/search/config.py",
      "split_seed: int = 1", "split_seed: int = 0", (ADAPT,)),
    M("val-batches-shuffled", "D_val batches in D_val's order (256 + 64)", "ekg/pruning.py",
      "val_batches = list(iterate_batches(d_val.to(device), cfg.batch_size, normalization=norm))",
      "val_batches = list(iterate_batches(d_val.to(device), cfg.batch_size, normalization=norm, shuffle=True))",
      (ADAPT,)),
    M("search-batch-160", "search batches of 256 (256 + 64 for CIFAR-10)", "ekg/search/config.py",
      "batch_size: int = 256", "batch_size: int = 160", (ADAPT, SDEF)),
    M("val-per-class-30", "D_val: 32 images per class", "ekg/search/config.py",
      "val_per_class: int = 32", "val_per_class: int = 30", (ADAPT,)),
    M("cli-val-per-class-30", "`ekg prune`: D_val 32 per class by default", "ekg/cli/common.py",
      'p.add_argument("--val-per-class", type=int, default=d.val_per_class,', 'p.add_argument("--val-per-class", type=int, default=30,',
      (SDEF,)),
    M("cli-sub-per-class-128", "`ekg prune`: D_sub 256 per class by default", "ekg/cli/common.py",
      'p.add_argument("--sub-per-class", type=int, default=d.sub_per_class,', 'p.add_argument("--sub-per-class", type=int, default=128,',
      (SDEF,)),
    M("search-otsu-trim-default", "Otsu drops 20% at each end", "ekg/search/config.py",
      "otsu_trim: float = 0.2", "otsu_trim: float = 0.1", (SDEF,)),
    M("search-bn-default-running", "the search's BN statistics are the batch's by default", "ekg/search/config.py",
      'search_bn: str = "batch"', 'search_bn: str = "running"', (SDEF, K0)),
    M("compat-default-release", "the method's rules by default, not the release's", "ekg/search/config.py",
      'compat: str = "method"', 'compat: str = "release"', (SDEF,)),
    M("search-keep-default", "default budget keep = 0.45", "ekg/cli/common.py",
      'p.add_argument("--keep", type=float, default=d.keep,', 'p.add_argument("--keep", type=float, default=0.5,',
      (SDEF,)),
    # ---------------------------------------------------------------- phase 5: fine-tuning
    M("ft-api-epochs", "fine-tuning: 100 epochs", "ekg/train.py",
      'recipe: dict[str, Any] = dict(arch="(pruned)", epochs=100,', 'recipe: dict[str, Any] = dict(arch="(pruned)", epochs=200,',
      (FTCFG,)),
    M("ft-milestones", "fine-tuning: lr ×0.2 at 30/60/80%", "ekg/train.py",
      "milestones=(0.3, 0.6, 0.8), gamma=0.2", "milestones=(0.5, 0.75), gamma=0.2", (FTCFG, SCHED)),
    M("ft-gamma", "fine-tuning: lr ×0.2 at 30/60/80%", "ekg/train.py",
      "milestones=(0.3, 0.6, 0.8), gamma=0.2", "milestones=(0.3, 0.6, 0.8), gamma=0.1", (FTCFG, SCHED)),
    M("ft-cli-epochs", "`ekg finetune`: 100 epochs", "ekg/cli/finetune.py",
      "f = finetune_config()\n", "f = finetune_config(epochs=200)\n", (FTCFG,)),
    M("ft-cli-batch", "`ekg finetune`: batch 128", "ekg/cli/finetune.py",
      "f = finetune_config()\n", "f = finetune_config(batch_size=256)\n", (FTCFG,)),
    M("ft-cli-lr", "`ekg finetune`: lr 0.01", "ekg/cli/finetune.py",
      "f = finetune_config()\n", "f = finetune_config(lr=0.1)\n", (FTCFG,)),
    M("ft-cli-cosine", "`ekg finetune`: step schedule", "ekg/cli/finetune.py",
      "f = finetune_config()\n", "f = finetune_config(schedule='cosine')\n", (FTCFG,)),
    M("ft-cli-wd", "`ekg finetune`: weight decay 5e-4", "ekg/cli/finetune.py",
      "f = finetune_config()\n", "f = finetune_config(weight_decay=1e-4)\n", (FTCFG,)),
    M("ft-cli-kd-single", "`ekg finetune`: the memory bank's ensemble by default", "ekg/cli/finetune.py",
      'p.add_argument("--kd", choices=KD_MODES, default=f.kd,',
      'p.add_argument("--kd", choices=KD_MODES, default="single",', (FTCFG,)),
    M("ft-cli-no-jitter", "two jittered views with the memory bank", "ekg/cli/finetune.py",
      "jitter=recipe.augment.jitter)", "jitter=False)", (FTCFG,)),
    M("ft-api-no-jitter", "two jittered views with the memory bank", "ekg/train.py",
      'augment=AugmentConfig(jitter=kd != "none")', "augment=AugmentConfig(jitter=False)", (FTCFG,)),
    M("ft-plain-with-jitter", "plain fine-tuning: flip + pad-crop only", "ekg/train.py",
      'augment=AugmentConfig(jitter=kd != "none")', "augment=AugmentConfig(jitter=True)", (FTCFG,)),
    M("ft-preset-epochs", "`ekg run --preset paper`: 100 epochs", "ekg/pipeline.py",
      '"paper": Preset("paper", epochs=100,', '"paper": Preset("paper", epochs=50,', (FTCFG,)),
    M("ft-preset-batch", "`ekg run --preset paper`: batch 128", "ekg/pipeline.py",
      "    batch_size: int = 128\n    lr: float = 0.01", "    batch_size: int = 64\n    lr: float = 0.01", (FTCFG,)),
    M("ft-preset-lr", "`ekg run --preset paper`: lr 0.01", "ekg/pipeline.py",
      "    batch_size: int = 128\n    lr: float = 0.01", "    batch_size: int = 128\n    lr: float = 0.1", (FTCFG,)),
    M("ft-no-nesterov", "fine-tuning: SGD Nesterov", "ekg/train.py",
      "    nesterov: bool = True", "    nesterov: bool = False", (FTCFG, KDSTEP)),
    M("ft-weight-decay", "fine-tuning: weight decay 5e-4", "ekg/train.py",
      "    weight_decay: float = 5e-4", "    weight_decay: float = 1e-4", (FTCFG, KDSTEP)),
    M("trainer-ignores-nesterov", "the trainer's SGD is Nesterov", "ekg/train.py",
      "momentum=cfg.momentum, nesterov=cfg.nesterov,", "momentum=cfg.momentum, nesterov=False,", (SCHED, KDSTEP)),
    M("trainer-ignores-weight-decay", "the trainer's SGD has weight decay 5e-4 on all parameters", "ekg/train.py",
      "                          weight_decay=cfg.weight_decay)", "                          weight_decay=0.0)",
      (SCHED, KDSTEP)),
    M("trainer-constant-lr", "the trainer applies the step schedule", "ekg/train.py",
      '                    group["lr"] = lr', '                    group["lr"] = cfg.lr', (SCHED,)),
    M("schedule-after-milestone", "lr ×0.2 from the milestone step on", "ekg/train.py",
      "return cfg.lr * (cfg.gamma ** sum(progress >= m for m in cfg.milestones))",
      "return cfg.lr * (cfg.gamma ** sum(progress > m for m in cfg.milestones))", (SCHED,)),
    M("kd-two-identical-views", "two augmented views of each image", "ekg/train.py",
      "views = [normalization.apply(augment_batch(raw, aug, aug_gen))[part] for _ in range(2)]",
      "views = [normalization.apply(augment_batch(raw, aug, aug_gen))[part]] * 2", (KDSTEP,)),
    M("kd-one-view", "the KD loss sums over both views", "ekg/train.py",
      "views = list(both.float().chunk(2))", "views = list(both.float().chunk(2))[:1]", (KDSTEP,)),
    M("kd-views-in-two-passes", "both views in one forward pass (BN statistics of the 2B images)", "ekg/train.py",
      "both = model(torch.cat(x))  # both views in one forward pass of 2B images",
      "both = torch.cat([model(v) for v in x])", (KDSTEP,)),
    M("kd-teacher-rows-misaligned", "teacher logits are the bank rows of the batch's images", "ekg/train.py",
      "teachers = bank.batch(idx[part], device=data.images.device)",
      "teachers = bank.batch(idx[part].sort().values, device=data.images.device)", (KDSTEP,)),
    M("kd-temperature-ignored", "KD at the configured temperature", "ekg/train.py",
      "kd = kd_loss(views, y, teachers, mode=cfg.kd, temperature=cfg.temperature)",
      "kd = kd_loss(views, y, teachers, mode=cfg.kd, temperature=1.0)", (KDSTEP,)),
    M("kd-temperature-always-4", "T = 10 for 1000-class data", "ekg/train.py",
      "temperature=default_temperature(num_classes))", "temperature=default_temperature(10))", (TEMP,)),
    M("kd-temperature-threshold", "T = 10 for 1000-class data", "ekg/train.py",
      "return 10.0 if num_classes >= 1000 else 4.0", "return 10.0 if num_classes > 1000 else 4.0", (TEMP,)),
    M("kd-t-squared", "T·KL, not T²·KL", "ekg/distill.py",
      "return t * (log_p.exp() * (log_p - log_q)).sum(-1)", "return t * t * (log_p.exp() * (log_p - log_q)).sum(-1)",
      (KDSTEP,)),
    M("kd-not-halved", "the gradient is halved", "ekg/distill.py",
      "loss = 0.5 * (ce_sum + kd_sum) / b", "loss = (ce_sum + kd_sum) / b", (KDSTEP,)),
    M("kd-selects-every-teacher", "teachers closer to teacher 0 than the student are selected", "ekg/distill.py",
      "return dist < curr", "return dist >= 0", (KDSTEP,)),
    M("kd-selects-farther-teachers", "teachers closer to teacher 0 than the student are selected", "ekg/distill.py",
      "return dist < curr", "return dist > curr", (KDSTEP,)),
    M("kd-teacher-zero-only", "M̄ = mean of the selected teachers", "ekg/distill.py",
      "target, selected = teachers[:, sel].mean(1), int(sel.sum())", "target, selected = teachers[:, 0], int(sel.sum())",
      (KDSTEP,)),
    M("kd-selection-on-view-0", "curr compares teacher 0 with the mean over views", "ekg/distill.py",
      "student_mean = torch.stack([v.float() for v in views]).mean(0)", "student_mean = views[0].float()", (KDSTEP,)),
    M("plain-ft-summed-ce", "plain fine-tuning: mean CE", "ekg/train.py",
      "        return F.cross_entropy(logits.float(), y), logits, None",
      '        return F.cross_entropy(logits.float(), y, reduction="sum") / 64, logits, None', (PLAIN,)),
    # the guards of a run (issue 16): not the method's rules, but each with a test that must catch a break
    M("lock-shared", "a second process on a run directory is refused", "ekg/lock.py",
      "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)", (LOCK,)),
    M("lock-inner-release", "the lock is re-entrant: the inner release keeps it", "ekg/lock.py",
      "    if entry[1]:\n        return\n", "", (REENTRANT,)),
    M("floor-two-channels", "the budget's floor: every prunable group at one channel", "ekg/search/searcher.py",
      "        widths[g.index] = min(g.channels, math.lcm(g.blocks, cfg.round_to))\n",
      "        widths[g.index] = 2 * min(g.channels, math.lcm(g.blocks, cfg.round_to))\n", (FLOOR,)),
    M("student-any-tensors", "a bank's student is a sub-network of its teachers' network", "ekg/bank.py",
      'wrong = [f"{k} is not in the pruned network" for k in own if k not in teacher]', "wrong = []",
      (BAD + "finetune: a ResNet-32 with a ResNet-20 run's bank]",)),
    M("bank-sparse", "the bank's arrays are preallocated (a full disk fails before any teacher)", "ekg/bank.py",
      "                _preallocate(path)\n", "", (FULL_BANK,)),
]


# ----------------------------------------------------------------------------- running

@dataclass
class Outcome:
    name: str
    rule: str
    status: str       # killed | SURVIVED | TIMEOUT (killed) | ERROR
    first_failure: str
    seconds: float


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{load}; Python {platform.python_version()}"


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def apply(mutant: Mutant, root: Path) -> None:
    path = root / "src" / mutant.file
    text = path.read_text()
    n = text.count(mutant.old)
    if n != 1:
        raise SystemExit(f"mutant {mutant.name}: the old text occurs {n} times in src/{mutant.file} (must be once)")
    path.write_text(text.replace(mutant.old, mutant.new))


def text_problems(chosen: list[Mutant], root: Path = ROOT) -> list[str]:
    """What is wrong with the mutants' replacements in ``root``'s ``src/``: a file that does not exist, an old
    text that does not occur exactly once in its file, or a replacement that changes nothing."""
    problems = []
    for m in chosen:
        path = root / "src" / m.file
        if not path.is_file():
            problems.append(f"mutant {m.name}: src/{m.file} does not exist")
            continue
        n = path.read_text().count(m.old)
        if n != 1:
            problems.append(f"mutant {m.name}: the old text occurs {n} times in src/{m.file} (must be once)")
        if m.old == m.new:
            problems.append(f"mutant {m.name}: the new text is the old one")
    return problems


def existing(targets: list[str], root: Path) -> list[str]:
    return [t for t in targets if (root / t.split("::")[0]).exists()]


def env_for(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("EKG_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pytest_cmd(targets: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *targets]


def first_failure(output: str) -> str:
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    return ""


def run_tests(root: Path, targets: list[str], timeout: float) -> tuple[int | None, str]:
    try:
        p = subprocess.run(pytest_cmd(targets), cwd=root, env=env_for(root), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return p.returncode, p.stdout + p.stderr


def check_import(root: Path) -> None:
    """The copy is what the tests import (not an installed ekg)."""
    out = subprocess.run([sys.executable, "-c", "import ekg; print(ekg.__file__)"], cwd=root, env=env_for(root),
                         capture_output=True, text=True).stdout.strip()
    if not out.startswith(str(root)):
        raise SystemExit(f"the tests would import ekg from {out}, not from the mutated copy in {root}")


def run_mutant(mutant: Mutant, targets: list[str], timeout: float) -> Outcome:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        apply(mutant, root)
        tests = existing(targets, root)
        if not tests:
            return Outcome(mutant.name, mutant.rule, "ERROR", "no test file exists", time.perf_counter() - t0)
        rc, out = run_tests(root, tests, timeout)
    dt = time.perf_counter() - t0
    if rc is None:
        return Outcome(mutant.name, mutant.rule, "TIMEOUT (killed)", f"> {timeout:.0f} s", dt)
    if rc == 0:
        return Outcome(mutant.name, mutant.rule, "SURVIVED", "", dt)
    if rc == 1:
        return Outcome(mutant.name, mutant.rule, "killed", first_failure(out) or "(see pytest output)", dt)
    tail = " | ".join(out.strip().splitlines()[-3:])
    return Outcome(mutant.name, mutant.rule, "ERROR", f"pytest exit {rc}: {tail[:200]}", dt)


def short(test: str) -> str:
    return test.replace("tests/", "").replace("test_rules_in_use.py::", "in_use::")


def table(rows: list[Outcome]) -> str:
    head = ("mutant", "rule", "result", "first failing test", "s")
    cells = [head] + [(o.name, o.rule, o.status, short(o.first_failure), f"{o.seconds:.0f}")
                      for o in rows]
    limits = (40, 64, 16, 120, 5)
    widths = [min(max(len(r[i]) for r in cells), limits[i]) for i in range(5)]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true",
                    help="check that every (chosen) mutant's old text occurs exactly once in its file, run nothing")
    ap.add_argument("--all-tests", action="store_true", help="run the whole fast suite per mutant")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel; default: %(default)s")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests; default: %(default)s")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    args = ap.parse_args()

    names = [m.name for m in MUTANTS]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate mutant names: {', '.join(sorted(dup))}")
    unknown = [n for n in args.only if n not in names]
    if unknown:
        raise SystemExit(f"unknown mutant(s): {', '.join(unknown)}; see --list")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    # every mutant's old text is present exactly once before anything runs
    problems = text_problems(chosen)
    if args.check:
        print("\n".join(problems) if problems else
              f"{len(chosen)} mutants: each old text occurs exactly once in its file")
        return 1 if problems else 0
    if problems:
        raise SystemExit("\n".join(problems))
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.rule}  [src/{m.file}; {', '.join(t.replace('tests/', '') for t in m.tests)}]")
        return 0

    def targets(m: Mutant) -> list[str]:
        return ["tests"] if args.all_tests else list(m.tests)

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"per mutant: PYTHONPATH=<copy>/src {' '.join(pytest_cmd(['<tests>'])[1:])}  (in a copy of src/, tests/)")
    missing = sorted({t.split("::")[0] for m in chosen for t in targets(m) if not (ROOT / t.split("::")[0]).exists()})
    if missing:
        print(f"note: not in this checkout, left out: {', '.join(missing)}")
    t_start = time.perf_counter()
    status = 0
    if not args.no_baseline:
        union = list(dict.fromkeys(t for m in chosen for t in targets(m)))
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
            root = Path(tmp)
            copy_tree(root)
            check_import(root)
            t0 = time.perf_counter()
            rc, out = run_tests(root, existing(union, root), args.timeout * 3)
        print(f"baseline (unmutated, {len(existing(union, ROOT))} targets): "
              f"{'pass' if rc == 0 else 'FAIL'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            print(out[-3000:])
            print("the unmutated tests fail: fix them first")
            return 1
    rows: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_mutant, m, targets(m), args.timeout) for m in chosen]
        for m, f in zip(chosen, futures):
            o = f.result()
            rows.append(o)
            print(f"  {o.name:36s} {o.status:9s} {o.seconds:5.0f} s  {short(o.first_failure)}",
                  flush=True)
    print()
    print(table(rows))
    survived = [o.name for o in rows if o.status in ("SURVIVED", "ERROR")]
    killed = sum(o.status.startswith(("killed", "TIMEOUT")) for o in rows)
    print(f"\n{killed}/{len(rows)} mutants killed in {time.perf_counter() - t_start:.0f} s"
          + (f"; not killed: {', '.join(survived)}" if survived else ""))
    if survived:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
