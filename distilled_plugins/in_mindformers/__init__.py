"""What runs inside mindformers' own processes: the training entry msrun starts (``train``), checkpoint generation
for evaluation (``mf_generate``), the OpenR1 data handler (``data_handler``) and the ``datasets_preprocess``
equivalent. Named so it cannot shadow the ``mindformers`` library when its folder is put on ``sys.path``."""
