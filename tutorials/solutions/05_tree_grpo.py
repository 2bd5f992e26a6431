"""Solutions to the exercises of tutorials/05_tree_grpo.ipynb: each block replaces the exercise cell of its number.

Try each exercise before you read its block. `python tutorials/run.py --solutions 05_tree_grpo` runs the notebook
with these answers (every check passes); tests/test_tutorials.py does the same.
"""


# %% Exercise 1
# Exercise 1: A(l) = z-score of R_l among its question's leaves + z-score among its tree's leaves (eps = 1e-6)
def my_tree_advantages(rewards, prompt_ids, tree_ids):
    rewards = torch.as_tensor(rewards, dtype=torch.float32)

    def z_scores(keys):  # the z-score of each leaf within the leaves that share its key; 0 in a group of one
        out = torch.zeros_like(rewards)
        for key in set(keys):
            members = torch.tensor([k == key for k in keys])
            if members.sum() > 1:
                group = rewards[members]
                out[members] = (group - group.mean()) / (group.std() + 1e-6)
        return out

    return z_scores(list(prompt_ids)) + z_scores(list(zip(prompt_ids, tree_ids)))


# %% Exercise 2
# Exercise 2: return (ids, mask): every step's and observation's token ids in order, mask 1 on the steps' tokens
def my_leaf_sequence(leaf):
    ids, mask = [], []
    for node in leaf.path():
        ids += node.step_ids + node.obs_ids
        mask += [1] * len(node.step_ids) + [0] * len(node.obs_ids)
    return ids, mask


# %% Exercise 3
# Exercise 3: the sum of advantages[i] over the leaves[i] whose path contains node
def my_step_credit(node, leaves, advantages):
    return sum(a for leaf, a in zip(leaves, advantages) if node in leaf.path())


# %% Exercise 4
# Exercise 4: your prediction for d = 6, luck 2: "tree", "chain" or "neither"
prediction_last = "tree"

# %% Exercise 5
# Exercise 5: your prediction for d = 1, luck 2: "tree", "chain" or "neither"
prediction_first = "chain"
