"""Solutions to the exercises of tutorials/01_grpo.ipynb: each block replaces the exercise cell of its number.

Try each exercise before you read its block. `python tutorials/run.py --solutions 01_grpo` runs the notebook
with these answers (every check passes); tests/test_tutorials.py does the same.
"""


# %% Exercise 1
# Exercise 1: return A_i = (r_i - mean of its group) / (std of its group + 1e-4), shape (num_groups * group_size,)
def my_group_advantages(rewards, group_size):
    groups = rewards.view(-1, group_size)  # (num_groups, G)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)


# %% Exercise 2
# Exercise 2: the mean over mask == 1 of -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A), w = exp(logps - old_logps)
def my_clipped_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.2):
    ratio = torch.exp(logps - old_logps)  # (B, T)
    advantages = advantages[:, None]  # (B, 1): every token of a row shares it
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    return (per_token * mask).sum() / mask.sum()


# %% Exercise 3
# Exercise 3: a value of eps_high
eps_high = 0.28  # DAPO's clip-higher value: 1.25 < 1.28 < 1.30

# %% Exercise 4
# Exercise 4: your prediction, one of "grpo", "bnpo", "dr_grpo", "dapo"
prediction = "grpo"


# %% Exercise 5
# Exercise 5: the mean over mask == 1 of exp(x) - x - 1, x = ref_logps - logps, exact near x = 0
def my_kl(logps, ref_logps, mask):
    x = ref_logps - logps
    return ((torch.expm1(x) - x) * mask).sum() / mask.sum()
