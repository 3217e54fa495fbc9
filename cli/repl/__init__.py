"""The interactive REPL (``sandbox repl``): prompts to the agent, slash commands, a live pool.

``session`` holds the loop and the live pool, ``slash`` the slash commands, ``prompt`` the
prompt-toolkit pieces (history, key bindings, completion, bottom toolbar).
"""
