"""Checkpoints in and out: Hugging Face import / export and MHA/GQA -> MLA conversion (MHA2MLA).

  hf_import.import_hf(hf_dir, workdir)     a local HF checkpoint directory -> a workdir
  hf_export.export_hf(workdir, out_dir)    a workdir -> a directory `transformers` loads
  mha2mla.convert(src, dst, ...)           an MHA/GQA workdir -> an MLA workdir (docs/interop.md)

Nothing here imports torch or transformers: safetensors files are read and written with numpy.
"""
