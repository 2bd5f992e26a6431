"""Solutions to the exercises of tutorials/02_prefix_grouper.ipynb: each block replaces the exercise cell of its number.

Try each exercise before you read its block. `python tutorials/run.py --solutions 02_prefix_grouper` runs the
notebook with these answers (every check passes); tests/test_tutorials.py does the same.
"""


# %% Exercise 1
# Exercise 1: return the position ids of the row [prompt][completion 1]...[completion G], shape (P + S_1 + ... + S_G,)
def my_position_ids(prompt_length, completion_lengths):
    prompt = torch.arange(prompt_length)  # 0 .. P-1
    # every completion restarts at P: it sits right after its prompt, as in its naive row
    return torch.cat([prompt] + [torch.arange(prompt_length, prompt_length + s) for s in completion_lengths])


# %% Exercise 2
# Exercise 2: return the bool "may attend" mask (S, P + S) of one completion's queries over [its prompt; itself]
def my_completion_mask(prompt_length, completion_length):
    sees_prompt = torch.ones(completion_length, prompt_length, dtype=torch.bool)  # every prompt key
    sees_itself = torch.ones(completion_length, completion_length, dtype=torch.bool).tril()  # its own keys k <= t
    return torch.cat([sees_prompt, sees_itself], dim=1)


# %% Exercise 3
# Exercise 3: which shape gains more at G = 8? one of "P=1024, S=32", "P=128, S=256"
prediction = "P=1024, S=32"  # 8 * 1056 / 1280 = 6.6x against 8 * 384 / 2176 = 1.4x

# %% Exercise 4
# Exercise 4: the ideal speed-up of P=128, S=256 as G grows without bound (a number)
value = (128 + 256) / 256  # G(P+S)/(P+GS) = (P+S)/(P/G+S) -> (P+S)/S = 1.5
