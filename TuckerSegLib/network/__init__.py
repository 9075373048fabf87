"""Network surgery: factorised conv modules, finding and replacing layers, counting cost."""
