"""Solutions to the exercises of tutorials/04_grpo_pp.ipynb: each block replaces the exercise cell of its number.

Try each exercise before you read its block. `python tutorials/run.py --solutions 04_grpo_pp` runs the notebook
with these answers (every check passes); tests/test_tutorials.py does the same. The imports below are the
notebook's own (its cells have them already).
"""

import torch

from tasks import lesions


# %% Exercise 1
# Exercise 1: write GRPO++'s sign advantage A_i = sign(r_i - mean of its group), in {-1, 0, +1}
def my_binary_advantages(rewards, group_size):
    """rewards: (num_groups * group_size,), each group's rewards next to each other. Returns the same shape.
    A difference from the group's mean no larger than 1e-5 * max(1, largest |r| in the group) counts as 0."""
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # r_i - mean of its group
    rounding = 1e-5 * grouped.abs().amax(dim=1, keepdim=True).clamp(min=1.0)  # (num_groups, 1)
    return torch.where(centred.abs() > rounding, torch.sign(centred), 0.0).flatten()


# %% Exercise 2
# Exercise 2: predict: for one right answer in a group of 8, which advantage is larger in size?
prediction_size = "z-score"  # one of "z-score", "sign", "equal"

# %% Exercise 3
# Exercise 3: predict: which token does the KL anchor pull back harder, the one 2 nats above or 2 below pi_ref?
prediction_pull = "below"  # one of "above", "below", "equal"


# %% Exercise 4
# Exercise 4: write the knowledge-graph score of an answer, +1 per fact the graph confirms, -1 per fact it contradicts
def my_kg_fact_score(answer, label):
    """The attributes in <think> against lesions.KNOWLEDGE_GRAPH[label] (the image's class; its values for k in
    lesions.ATTRIBUTES); the symptoms and care stated after </answer> against the node of the class the answer
    names (its "symptoms", a list, and its "care"), or of `label` if the answer names no class the graph knows."""
    parsed = lesions.parse_answer(answer)
    truth = lesions.KNOWLEDGE_GRAPH[label]
    named = lesions.KNOWLEDGE_GRAPH.get(parsed["answer"], truth)
    attributes = parsed["attributes"]
    right_attributes = len(attributes & {truth[k] for k in lesions.ATTRIBUTES})
    facts = lesions.stated_facts(answer)
    right_facts = len(facts & {*named["symptoms"], named["care"]})
    wrong = len(attributes) - right_attributes + len(facts) - right_facts
    return right_attributes + right_facts - wrong


# %% Exercise 5
# Exercise 5: write the DPO loss, the mean over pairs (each entry: an answer's summed token log-probs)
def my_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """The mean over pairs of -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),
    each argument a tensor (num_pairs,). -log sigmoid(z) = softplus(-z): torch.nn.functional.softplus."""
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return torch.nn.functional.softplus(-margin).mean()
