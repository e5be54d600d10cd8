"""The named choices of the library's settings, in one TensorFlow-free module: the modules that
implement them import them from here (synthetic.INITS, synthetic.DECODERS, matching.DM_REDUCTIONS,
...), and the command line builds its enum flags and messages from them without importing
TensorFlow (so --help stays fast). A new choice is added here and implemented there.
"""
PHASES = ("experts", "condense", "evaluate", "export")  # pipeline: the phases of a run, in order
INITS = ("gaussian", "real")                          # synthetic: the set's init
RANGE_MAPS = ("clip", "tanh")                         # synthetic: how renders stay in the pixel range
DECODERS = ("residual", "transposed")                 # synthetic.LatentSynthetic: decoder architecture
DM_REDUCTIONS = ("sum", "class_mean", "element_mean")  # matching: how L_DM reduces its distances
LR_SCHEDULES = ("linear", "constant")                 # condense: the synthetic set's lr schedule
BASELINES = ("random", "herding")                     # pipeline: real-subset baselines beside the set
REAL_DATA = ("auto", "memory", "stream")              # data / streamed: how real images are held
