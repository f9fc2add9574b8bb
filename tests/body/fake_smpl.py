"""A generated SMPL model file with the structure of the licensed one (6,890 vertices, 24 joints, 10 betas,
207 pose blend shapes), made of plain numpy arrays, to test the smplx path without the real files."""

import pickle

import numpy as np

SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]


def write_fake_smpl(path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    V, J = 6890, 24
    joints = np.zeros((J, 3))
    for j in range(1, J):  # a tree of bones about 12 cm long
        joints[j] = joints[SMPL_PARENTS[j]] + rng.normal(size=3) * 0.12
    v_template = joints[rng.integers(0, J, V)] + rng.normal(size=(V, 3)) * 0.04
    d2 = ((v_template[:, None] - joints[None]) ** 2).sum(-1)
    weights = np.exp(-(d2 - d2.min(1, keepdims=True)) / 0.002)
    weights /= weights.sum(1, keepdims=True)
    nearest = np.argsort(d2, axis=0)[:40]  # each joint regressed from its 40 nearest vertices
    J_regressor = np.zeros((J, V))
    for j in range(J):
        J_regressor[j, nearest[:, j]] = rng.random(40)
    J_regressor /= J_regressor.sum(1, keepdims=True)
    kintree = np.array([[4294967295] + SMPL_PARENTS[1:], list(range(J))], dtype=np.int64)
    data = {
        "v_template": v_template,
        "f": rng.integers(0, V, size=(13776, 3)).astype(np.uint32),
        "weights": weights,
        "J_regressor": J_regressor,
        "kintree_table": kintree,
        "shapedirs": rng.normal(size=(V, 3, 10)) * 0.01,
        "posedirs": rng.normal(size=(V, 3, 207)) * 0.002,
    }
    with open(path, "wb") as f:
        pickle.dump(data, f)
