"""Hand-written TIR schedules for the integer graph's hot ops, one module per instruction set.

`lower.targets` picks a schedule set per target from the target's CPU features (data, not code); the
Relax builder (`lower.tvm_build`) asks the chosen set for each conv2d it can handle and falls back to the
plain Relax ops (TVM's default loops) for the rest.
"""
