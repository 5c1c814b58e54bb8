"""The names of the ways to fill gap slices: the method and the evaluation's baselines.

Kept free of heavy imports so that the command line can list them without loading torch.
"""

# The full method and the evaluation's baselines and ablations (issue 6, METHOD.md section 6):
#   rebrain          y = acquired slice or SLERP of its neighbours; ControlNet guided by the
#                    retrieved reference when its similarity >= tau, else by the SLERP
#   rebrain-noslerp  the same, but a retrieval failure still uses its (below-tau) reference
#   bbdm             BBDM alone on y, no retrieval, no ControlNet
#   r-as-input       the retrieved reference replaces y of a gap slice (when >= tau), no ControlNet
#   substitute       a gap slice is the retrieved reference's MRI slice (no diffusion); acquired
#                    slices are translated by BBDM alone
#   interp           only the acquired slices are translated (BBDM alone); gaps are the linear
#                    interpolation of their translated neighbours (a sparsity-unaware translator)
METHODS = ("rebrain", "rebrain-noslerp", "bbdm", "r-as-input", "substitute", "interp")

# Groups the pipeline and the evaluation branch on, named once.
WITH_CONTROLNET = ("rebrain", "rebrain-noslerp")  # guided by the ControlNet (when the preset has one)
WITHOUT_RETRIEVAL = ("bbdm", "interp")  # never query the knowledge base
IGNORING_TAU = ("rebrain-noslerp", "substitute")  # use the top candidate even below tau
