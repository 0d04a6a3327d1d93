"""The demos behind ``opendelta demo``: real pretrained models, real data, shipped by pip packages."""
