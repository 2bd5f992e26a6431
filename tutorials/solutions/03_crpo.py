"""Solutions to the exercises of tutorials/03_crpo.ipynb: each block replaces the exercise cell of its number.

Try each exercise before you read its block. `python tutorials/run.py --solutions 03_crpo` runs the notebook
with these answers (every check passes); tests/test_tutorials.py does the same.
"""


# %% Exercise 1
# Exercise 1: the faithfulness reward of `response` to `item`: 0 if malformed, else 0.5 * precision + 0.5 * grounded
def faithfulness(response):  # start from parsed = clinic.parse_response(response, item)
    parsed = clinic.parse_response(response, item)
    if not parsed["formatted"]:
        return 0.0
    cited = parsed["cited"]
    precision = sum(clinic.in_case(f, item) for f in cited) / len(cited) if cited else 0.0  # none cited: 0
    rejected = {letter for letter, _ in parsed["rejections"]}
    grounded = parsed["conclusion"] in parsed["fits"] and parsed["conclusion"] not in rejected
    return 0.5 * precision + 0.5 * float(grounded)


# %% Exercise 2
# Exercise 2: R_i = sum_j w_j R_ij, then A_i = (R_i - group mean) / (group std + 1e-4), std unbiased; shape (B*G,)
def crpo_advantages(rewards_by_objective, weights, group_size):
    total = sum(w * rewards_by_objective[name].float() for name, w in weights.items())  # (B*G,)
    groups = total.view(-1, group_size)  # (B, G)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)


# %% Exercise 3
# Exercise 3: the smallest accuracy weight k for which no wrong answer can outscore a right one
value = 2.0  # faithfulness and comprehensiveness each lie in [0, 1]: a wrong answer gains at most 2 from them


# %% Exercise 4
# Exercise 4: z-score each weighted objective in its group, sum w_j * z_ij, then z-score the sum over the whole batch
def normalize_then_sum(rewards_by_objective, weights, group_size):
    combined = 0.0
    for name, w in weights.items():
        groups = rewards_by_objective[name].float().view(-1, group_size)  # (B, G)
        z = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)
        combined = combined + w * z
    combined = combined.view(-1)  # (B*G,)
    return (combined - combined.mean()) / (combined.std() + 1e-4)
