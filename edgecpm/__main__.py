from edgecpm.cli import main

main()
