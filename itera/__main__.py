from itera.cli import main

main()
