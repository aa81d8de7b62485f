
r*metaP