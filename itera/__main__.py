from itera.commands import main

main()
