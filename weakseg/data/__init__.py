"""Package data: the ImageNet WordNet hierarchy used by the ``voc`` label map."""
