"""What each registration option means, written once.

``inrlddmm``'s ``--help`` and the interfaces' trait descriptions both show
these texts, keyed by the option's name as
:func:`~nipype_inrlddmm.engine.config_from_options` takes it (``fine_iterations``
is the fine stage's ``iterations``).  Nothing is imported here, so the
command line can print its help before torch is loaded; the defaults come
from the engine's configuration where each is shown.
"""

HELP = {
    "n_steps": "Euler steps of the flow over t in [0, 1]",
    "width": "hidden units per layer of the velocity MLP; when not given, 96 if the fine stage's grid has at most "
             "64^3 voxels, 128 if more",
    "depth": "hidden layers of the velocity MLP (the paper uses 3)",
    "encoding": "input encoding of the velocity MLP: fourier (random Fourier features), siren or none",
    "similarity": "image dissimilarity: lncc (CT->CBCT, MR), ncc, mse, mi (Mattes mutual information) or mind "
                  "(MIND-SSC descriptors, across modalities such as MR->ultrasound)",
    "mind_distance_mm": "mind: distance between the neighbourhoods each descriptor compares (mm)",
    "mind_radius_mm": "mind: half-width of the box over which neighbourhoods are compared (mm)",
    "mi_weight": "weight of a Mattes mutual information term (32 bins, over all patch voxels) added to the "
                 "similarity (unless that is mi), as a second ANTs metric; 0 turns it off",
    "reg_weight": "weight of the velocity penalty (1/n) sum_i ||v_i||^2 (mm^-2)",
    "jacobian_weight": "weight of the spread of log det J of the displacement on the patch lattices (SDlogJ "
                       "squared for deviations under jacobian_scale, linear beyond): smooth, fold-free fields; "
                       "0 turns it off",
    "outside_jacobian_weight": "with a fixed mask, the weight of that spread on the patches drawn outside it for the "
                              "penalties alone, where the field need only be smooth (none: jacobian_weight, with "
                              "those patches drawn anywhere)",
    "jacobian_scale": "deviation of log det J from its mean past which the Jacobian penalty grows linearly rather "
                      "than by its square, so large anatomical volume changes stay affordable",
    "velocity_window_mm": "with a fixed mask, the velocity is the network's within the first distance (mm) of "
                          "the mask and of the moving image's foreground, tapers to the network's bias alone at "
                          "the second, and the field is one translation beyond, as SyN's fades away from the "
                          "anatomy (default 5 25)",
    "coarse_factor": "block size by which both images are averaged for the coarse stage, at least 2; by default, "
                     "per axis, the one closest in ratio to 3 mm voxels",
    "coarse_iterations": "Adam iterations of the coarse stage",
    "distill_iterations": "Adam iterations of the distillation",
    "fine_iterations": "Adam iterations of the fine stage",
    "warm_iterations": "Adam iterations of the fine stage when it starts from a previous registration's model "
                       "(register: --init-model; study: the manifest's init_model column), the only stage then",
    "warm_learning_rate": "learning rate of that warm-started fine stage (a third of the fine stage's: the network "
                          "already holds a whole field, which the full rate would scatter)",
    "warm_regularity_patches": "with a fixed mask, patches drawn outside it for the smoothness penalties alone at "
                               "each iteration of that warm-started fine stage, at 48 image patches, as the fine "
                               "stage's (0: two thirds of the work per iteration, less accurate on some days)",
    "convergence_window": "iterations over which the loss trend is fitted to stop a stage early, as ANTs' "
                          "convergence window; 0 runs every iteration",
    "convergence_threshold": "stop a stage once its loss fell by less than this fraction of its magnitude over the "
                             "convergence window",
    "seed": "random seed (network initialisation, sampled points): the same seed and thread count give the same "
            "field, bit for bit on the CPU",
}
