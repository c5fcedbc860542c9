"""Our own GPU kernels, written in Triton. Importing this package imports no Triton: each kernel module
does that itself when it is first used."""
