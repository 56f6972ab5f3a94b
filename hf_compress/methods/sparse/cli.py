def add_command(sub):
    sub.add_parser("prune")
