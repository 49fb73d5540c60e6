from samft.synth.cli import main

main()
