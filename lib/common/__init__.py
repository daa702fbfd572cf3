"""Small pieces every layer uses: the one reader of typed settings, the one atomic file writer, the one LRU."""
